"""Random headers and shapes (sizes down to one voxel, spacings from microns to centimetres, oblique and
mirrored directions, integer and float voxel types, odd value ranges), written to files and segmented through
the CLI: each gives a labelmap on exactly the input's grid, or one clear error and no output. Seeded."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hybridmim.cli import main

PIXEL_TYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64]
SUFFIXES = [".nii.gz", ".nrrd", ".mha"]


def random_direction(rng: np.random.Generator) -> np.ndarray:
    """A random rotation, sometimes mirrored (determinant -1), sometimes exactly axis-aligned."""
    if rng.random() < 0.3:
        direction = np.eye(3)[rng.permutation(3)]
    else:
        direction, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    return direction * rng.choice([-1, 1], size=3)


def random_volume(rng: np.random.Generator, huge: bool = False) -> sitk.Image:
    """Physical extent up to 12 cm per axis (seconds of CPU); ``huge``: metres per axis, which at the model's
    1 mm would need billions of voxels."""
    size = [int(rng.integers(40, 60)) if huge else int(rng.choice([1, 2, 3, int(rng.integers(4, 70))]))
            for _ in range(3)]
    dtype = PIXEL_TYPES[rng.integers(len(PIXEL_TYPES))]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low, high = max(info.min, -(2**40)), min(info.max, 2**40)
        array = rng.integers(low, high, size=size[::-1], dtype=np.int64, endpoint=True).astype(dtype)
    else:
        array = (rng.standard_normal(size[::-1]) * 10.0 ** rng.uniform(-3, 6)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    spacing = [float(rng.uniform(40, 100)) if huge else min(float(10 ** rng.uniform(-2.5, 1.3)), 120 / n)
               for n in size]
    image.SetSpacing(spacing)
    image.SetOrigin([float(rng.uniform(-1e4, 1e4)) for _ in range(3)])
    image.SetDirection(random_direction(rng).flatten().tolist())
    return image


@pytest.mark.parametrize("seed", range(24))
def test_random_header_gives_own_grid_or_clear_error(seed, tmp_path, capsys):
    rng = np.random.default_rng(seed)
    image = random_volume(rng, huge=seed % 6 == 5)
    source = tmp_path / f"input{SUFFIXES[seed % len(SUFFIXES)]}"
    sitk.WriteImage(image, str(source))
    written = sitk.ReadImage(str(source))  # what the file really says (formats round some header values)
    output = tmp_path / "labels.nii.gz"
    code = main(["segment", str(source), "-o", str(output), "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    if seed % 6 == 5:
        assert code == 2 and "check the spacing in its header" in captured.err
    if code != 0:
        assert code == 2 and captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1
        assert not output.exists() and list(tmp_path.iterdir()) == [source]
        return
    labels = sitk.ReadImage(str(output))
    assert labels.GetSize() == written.GetSize()
    assert np.allclose(labels.GetSpacing(), written.GetSpacing(), rtol=1e-5)
    assert np.allclose(labels.GetOrigin(), written.GetOrigin(), rtol=1e-5, atol=1e-3)
    assert np.allclose(labels.GetDirection(), written.GetDirection(), atol=1e-5)
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    assert set(values.tolist()) <= {0, 1, 2}
