"""The worker process the Slicer module runs (``hybridmim`` with ``--progress json``), end to end with plain
Python: spawned exactly as the module spawns it, its records, its results equal to the in-process engine voxel for
voxel, Cancel (SIGTERM, then kill) leaving no files, and a crashed worker reported with the end of its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BUNDLED_MODEL, REPO, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.errors import Cancelled, HybridMIMError
from hybridmim.imageio import read_volume
from hybridmim.model_store import user_models_dir
from HybridMIMSegmentLib.worker import WorkerCrashed, WorkerProcess, python_executable


def segment_worker(tmp_image=SAMPLE_IMAGE, *extra: str) -> WorkerProcess:
    worker = WorkerProcess("test")
    output = worker.folder / "labels.nrrd"
    return worker.start(["segment", str(tmp_image), "-o", str(output), "--model", str(BUNDLED_MODEL),
                         "--device", "cpu", *extra])


def test_outside_slicer_the_worker_is_this_interpreter():
    assert python_executable() == sys.executable


def test_segment_records_and_result_equal_the_engine(segmenter):
    worker = segment_worker()
    seen = []
    assert worker.wait(300, seen.extend)
    assert worker.error is None, worker.error
    events = [r["event"] for r in seen]
    assert events[-1] == "result" and "progress" in events
    fractions = [r["fraction"] for r in seen if r["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    result = worker.result
    assert result["id"] == "hippocampus-cnn" and result["device"] == "cpu"
    written = sitk.ReadImage(result["output"])
    expected = segmenter.segment(read_volume(SAMPLE_IMAGE))
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    assert written.GetOrigin() == expected.GetOrigin() and written.GetDirection() == expected.GetDirection()
    assert written.GetSpacing() == expected.GetSpacing()
    worker.cleanup()
    assert not worker.folder.exists()


def test_an_engine_error_is_one_message_and_leaves_no_folder(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    worker = segment_worker(broken)
    assert worker.wait(120)
    assert isinstance(worker.error, HybridMIMError) and not isinstance(worker.error, WorkerCrashed)
    assert "broken.nii.gz" in str(worker.error)
    assert worker.result is None and not worker.folder.exists()


def test_a_crashed_worker_reports_the_end_of_its_log():
    worker = WorkerProcess("test").start(["segment", "--no-such-option"])  # dies before any record
    assert worker.wait(120)
    assert isinstance(worker.error, WorkerCrashed)
    assert "exit code 2" in str(worker.error) and "arguments are required: input" in str(worker.error)
    assert not worker.folder.exists()


def test_a_killed_worker_is_reported_as_crashed():
    worker = WorkerProcess("test").start(
        ["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--device", "cpu", "--steps", "100000"])
    deadline = time.monotonic() + 120
    while not worker.records and time.monotonic() < deadline:
        worker.poll()
        time.sleep(0.05)
    os.kill(worker._process.pid, signal.SIGKILL)  # what the out-of-memory killer does
    assert worker.wait(60)
    assert isinstance(worker.error, WorkerCrashed) and f"exit code {-signal.SIGKILL}" in str(worker.error)


def test_cancel_stops_a_fine_tune_and_leaves_no_files():
    worker = WorkerProcess("test").start(
        ["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--device", "cpu", "--steps", "100000"])
    deadline = time.monotonic() + 180
    while not any(r["event"] == "step" for r in worker.records) and time.monotonic() < deadline:
        worker.poll()
        time.sleep(0.05)
    assert any(r["event"] == "step" for r in worker.records), worker.log_tail()
    worker.cancel()
    started = time.monotonic()
    assert worker.wait(60)
    assert time.monotonic() - started < 30
    assert isinstance(worker.error, Cancelled)
    assert not worker.running and not worker.folder.exists()
    folder = user_models_dir()
    assert not folder.exists() or not list(folder.iterdir())  # no version, not even a staging folder


@pytest.mark.slow
def test_sigterm_unwinds_the_cli_with_a_cancelled_record(tmp_path):
    """What Cancel sends: the CLI reports it, exits 130 and writes nothing."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "HybridMIMSegment")}
    output = tmp_path / "labels.nii.gz"
    big = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.Expand(read_volume(SAMPLE_IMAGE), [4, 4, 4]), str(big))
    process = subprocess.Popen([sys.executable, "-m", "hybridmim.cli", "segment", str(big), "-o", str(output),
                                "--device", "cpu", "--progress", "json"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first = json.loads(process.stdout.readline())
    assert first["event"] == "progress"
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    assert json.loads(rest.strip().splitlines()[-1])["event"] == "cancelled"
    assert not output.exists()


@pytest.mark.parametrize("option", ["--labeled", "--unlabeled", "--validation"])
def test_repeated_list_options_add_up(option):
    from hybridmim.cli import build_parser

    value = f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}" if option != "--unlabeled" else str(SAMPLE_IMAGE)
    base = [] if option == "--labeled" else ["--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}"]
    args = build_parser().parse_args(["finetune", *base, option, value, option, value, value])
    assert len(getattr(args, option[2:])) == 3


def test_method_choices_of_the_command_line_are_the_registry():
    from hybridmim.cli import build_parser
    from hybridmim.methods import AUTOMATIC, METHODS

    pair = f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}"
    for method in (AUTOMATIC, *METHODS):
        assert build_parser().parse_args(["finetune", "--labeled", pair, "--method", method]).method == method
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--labeled", pair, "--method", "fixmatch"])


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
@pytest.mark.slow
def test_cancel_reaches_the_interpreter_behind_a_launcher(tmp_path):
    """PythonSlicer is a launcher that starts the real interpreter as a child and dies on SIGTERM at once: Cancel
    must still stop the child, and the run counts as ended only when no process of it is left."""
    launcher = tmp_path / "PythonLauncher"
    launcher.write_text(f"#!{sys.executable}\n"
                        "import os, signal, subprocess, sys\n"
                        "signal.signal(signal.SIGTERM, lambda *a: os._exit(143))\n"
                        "sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))\n")
    launcher.chmod(0o755)
    worker = WorkerProcess("test").start(
        ["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--device", "cpu", "--steps", "100000"],
        python=str(launcher))
    deadline = time.monotonic() + 180
    while not any(r["event"] == "step" for r in worker.records) and time.monotonic() < deadline:
        worker.poll()
        time.sleep(0.05)
    assert any(r["event"] == "step" for r in worker.records), worker.log_tail()
    group = worker._process.pid
    worker.cancel()
    assert worker.wait(60)
    assert isinstance(worker.error, Cancelled)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # launcher and interpreter are both gone
    assert not worker.folder.exists()
    folder = user_models_dir()
    assert not folder.exists() or not list(folder.iterdir())


@pytest.mark.parametrize("discards", [True, False], ids=["segment-like", "fine-tune-like"])
@pytest.mark.slow
def test_a_run_that_completed_before_the_cancel(discards):
    """A segmentation not yet in the scene is dropped; a fine-tune's model, already written and active, is
    reported rather than hidden."""
    worker = WorkerProcess("test", cancel_discards_result=discards).start(
        ["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--device", "cpu", "--steps", "1"])
    worker._process.wait(300)  # it has finished; nobody has polled yet
    worker.cancel()
    assert worker.wait(30)
    if discards:
        assert isinstance(worker.error, Cancelled) and worker.result is None
    else:
        assert worker.error is None and worker.result["version"] == "2.0.0-ft.1"
    worker.cleanup()


@pytest.mark.skipif(os.name != "posix", reason="the parent watch is POSIX")
@pytest.mark.slow
def test_the_worker_stops_when_the_application_is_gone(tmp_path):
    """A crashed or killed Slicer leaves no fine-tune running on to write a model."""
    application = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"])
    env = {**os.environ, "PYTHONPATH": str(REPO / "HybridMIMSegment"), "HYBRIDMIM_PARENT_PID": str(application.pid)}
    worker = subprocess.Popen([sys.executable, "-m", "hybridmim.cli", "finetune", "--labeled",
                               f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--device", "cpu", "--steps", "100000",
                               "--progress", "json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    application.wait()
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 130
    assert json.loads(output.strip().splitlines()[-1])["event"] == "cancelled"
    folder = user_models_dir()
    assert not folder.exists() or not list(folder.iterdir())
