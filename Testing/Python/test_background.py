"""The background worker used by the Slicer module: result, error and cancellation cross the thread boundary."""

from __future__ import annotations

import threading

import pytest

from conftest import SAMPLE_IMAGE
from hybridmim.errors import Cancelled
from hybridmim.imageio import read_volume
from HybridMIMSegmentLib.background import BackgroundTask


def test_result_and_progress_come_back(segmenter):
    image = read_volume(SAMPLE_IMAGE)
    task = BackgroundTask(lambda report, cancel: segmenter.segment(image, report, cancel)).start()
    assert task.wait(120)
    assert task.done and task.error is None
    assert task.result.GetSize() == image.GetSize()
    assert task.fraction == 1.0


def test_error_is_handed_over_not_raised_in_the_thread():
    def fail(report, cancel):
        raise ValueError("broken input")

    task = BackgroundTask(fail).start()
    task.wait(10)
    assert isinstance(task.error, ValueError) and task.result is None


def test_cancel_reaches_the_engine(segmenter):
    import SimpleITK as sitk

    started = threading.Event()
    big = sitk.Expand(read_volume(SAMPLE_IMAGE), [3, 3, 3])

    def work(report, cancel):
        def progress(fraction, message):
            report(fraction, message)
            started.set()
        return segmenter.segment(big, progress, cancel)

    task = BackgroundTask(work).start()
    assert started.wait(60)
    task.cancel()
    assert task.wait(60)
    assert isinstance(task.error, Cancelled) and task.result is None


def test_not_done_before_start():
    task = BackgroundTask(lambda report, cancel: None)
    assert not task.done
    with pytest.raises(RuntimeError):
        task.wait(0.01)
