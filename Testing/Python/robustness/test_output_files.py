"""Written label maps appear whole or not at all: every format reads back as the labels, a full disk is an error
(not a truncated file reported as written), and unwritable outputs are refused before any work."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_IMAGE
from hybridmim.cli import main
from hybridmim.errors import OutputError
from hybridmim.imageio import LABELMAP_SUFFIXES, STAGING_PREFIX, write_labelmap
from hybridmim.model_card import Label
from hybridmim.staging import STALE_STAGING_SECONDS

LABELS = [Label(1, "one", [1.0, 0.0, 0.0]), Label(2, "two", [0.0, 1.0, 0.0])]


def random_labelmap(size: int) -> sitk.Image:
    """Labels that do not compress much, on a rotated, anisotropic grid."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 3, (size,) * 3, dtype=np.uint8))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-12.5, 30.0, 7.25))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


@pytest.mark.parametrize("suffix", LABELMAP_SUFFIXES)
def test_every_format_reads_back_as_the_labels_and_leaves_nothing_else(tmp_path, suffix):
    labelmap = random_labelmap(24)
    path = write_labelmap(labelmap, tmp_path / f"out{suffix}", LABELS)
    back = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labelmap))
    assert np.allclose(back.GetDirection(), labelmap.GetDirection()) and np.allclose(back.GetOrigin(),
                                                                                      labelmap.GetOrigin())
    expected = {path.name} | ({"out.zraw"} if suffix == ".mhd" else set())  # a .mhd's data file moved with it
    assert {p.name for p in tmp_path.iterdir()} == expected


def test_staging_left_by_a_killed_run_is_removed_by_the_next_write(tmp_path):
    """kill -9 cannot unwind: its hidden staging folder is removed once it is old, and nothing else is touched."""
    stale, fresh, other = tmp_path / f"{STAGING_PREFIX}k3j2", tmp_path / f"{STAGING_PREFIX}x9q1", tmp_path / ".keep"
    for folder in (stale, fresh, other):
        folder.mkdir()
        (folder / "out.nii.gz").write_bytes(b"half")
    old = time.time() - STALE_STAGING_SECONDS - 60
    for folder in (stale, other):
        os.utime(folder, (old, old))
    write_labelmap(random_labelmap(8), tmp_path / "out.nii.gz", LABELS)
    assert not stale.exists() and fresh.exists() and other.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only: elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    with contextlib.suppress(OSError):
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("suffix", LABELMAP_SUFFIXES)
def test_a_full_disk_is_an_error_and_leaves_no_file(small_disk, suffix):
    target = small_disk / f"labels{suffix}"
    with pytest.raises(OutputError, match="Cannot write"):
        write_labelmap(random_labelmap(96), target, LABELS)  # about 880 KB of labels, 64 KiB of disk
    assert list(small_disk.iterdir()) == []  # no partial output, no staging folder
    small = write_labelmap(random_labelmap(8), target, LABELS)  # the same disk takes a file that fits
    assert small.exists()


@pytest.mark.parametrize("output, preview, message", [
    ("/sys/labels.nii.gz", None, "does not accept new files"),
    ("{tmp}/file.txt/labels.nii.gz", None, "is a file, not a folder"),
    ("{tmp}/" + "x" * 300 + ".nii.gz", None, "bytes long"),
    ("{tmp}/labels.nii.gz", "/sys/preview.png", "does not accept new files"),
    ("{tmp}/labels.nii.gz", "{tmp}/preview.jpg", "use one of .png"),
])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, output, preview, message):
    (tmp_path / "file.txt").write_text("not a folder", encoding="utf-8")
    arguments = ["segment", str(SAMPLE_IMAGE), "--output", output.format(tmp=tmp_path),
                 "--device", "cpu", "--quiet"]
    if preview:
        arguments += ["--preview", preview.format(tmp=tmp_path)]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the label map was not written either
