"""Every unusable input gives one clear error (exit code 2, one 'error:' line) and writes nothing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.cli import main
from hybridmim.model_store import user_models_dir


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def make_2d(folder: Path) -> Path:
    path = folder / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 30), np.float32)), str(path))
    return path


def make_4d(folder: Path) -> Path:
    path = folder / "series.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 10, 12, 14), np.float32), isVector=False), str(path))
    return path


def make_empty(folder: Path) -> Path:
    path = folder / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def make_truncated(folder: Path) -> Path:
    path = folder / "truncated.nii.gz"
    path.write_bytes(SAMPLE_IMAGE.read_bytes()[:20000])
    return path


def make_truncated_raw(folder: Path) -> Path:
    """An uncompressed NIfTI whose voxel data stops half-way."""
    path = folder / "truncated.nii"
    data = gzip.decompress(SAMPLE_IMAGE.read_bytes())
    path.write_bytes(data[: len(data) // 2])
    return path


def make_text(folder: Path) -> Path:
    path = folder / "notes.nrrd"
    path.write_text("This is a text file, not an image.\n", encoding="utf-8")
    return path


def make_nan(folder: Path) -> Path:
    path = folder / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 30, 40), np.nan, np.float32)), str(path))
    return path


def make_rgb(folder: Path) -> Path:
    path = folder / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9, 10, 3), np.uint8), isVector=True), str(path))
    return path


def make_huge_spacing(folder: Path) -> Path:
    """A header claiming 50 mm voxels: at the model's 1 mm this would need tens of GB."""
    path = folder / "huge_spacing.nrrd"
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    image.SetSpacing((50.0, 50.0, 50.0))
    sitk.WriteImage(image, str(path))
    return path


def make_larger_than_memory(folder: Path) -> Path:
    """A MetaImage header claiming 10^13 int16 voxels (20 TB) over a 1 kB data file."""
    (folder / "huge.raw").write_bytes(bytes(1000))
    path = folder / "huge.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 1000\nElementType = MET_SHORT\n"
                    "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n", encoding="utf-8")
    return path


def make_with_geometry(name: str, direction=None, origin=None):
    def make(folder: Path) -> Path:
        image = sitk.ReadImage(str(SAMPLE_IMAGE))
        if direction is not None:
            image.SetDirection(direction)
        if origin is not None:
            image.SetOrigin(origin)
        path = folder / f"{name}.mha"
        sitk.WriteImage(image, str(path))
        return path
    return make


def make_gzip_bomb(folder: Path) -> Path:
    """8 kB of .nii.gz whose header declares 4096^3 voxels: refused from the header, never decompressed."""
    source = folder / "small.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int8)), str(source))
    header = bytearray(source.read_bytes()[:352])
    struct.pack_into("<8h", header, 40, 3, 4096, 4096, 4096, 1, 1, 1, 1)
    path = folder / "bomb.nii.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(header)
        stream.write(bytes(8 << 20))
    source.unlink()
    return path


def make_overflowing_slope(folder: Path) -> Path:
    """An int16 NIfTI whose scl_slope 1e37 scales most stored values beyond float32 (the reader gives inf)."""
    path = folder / "slope.nii"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(SAMPLE_IMAGE)), sitk.sitkInt16), str(path))
    header = bytearray(path.read_bytes())
    struct.pack_into("<ff", header, 112, 1e37, 0.0)  # scl_slope, scl_inter
    path.write_bytes(header)
    return path


BAD_INPUTS = {
    "2D image": (make_2d, "2D image"),
    "4D image": (make_4d, "4D image"),
    "empty file": (make_empty, "empty"),
    "truncated gzip": (make_truncated, "Cannot read"),
    "truncated raw": (make_truncated_raw, "Cannot read"),
    "non-image file": (make_text, "Cannot read"),
    "NaN volume": (make_nan, "no finite values"),
    "overflowing scl_slope": (make_overflowing_slope, "scl_slope"),
    "colour image": (make_rgb, "components per voxel"),
    "absurd spacing": (make_huge_spacing, "check the spacing in its header"),
    "larger than memory": (make_larger_than_memory, "GiB is available"),
    "gzip bomb": (make_gzip_bomb, "GiB is available"),
    "skewed direction": (make_with_geometry("skewed", direction=(1, 0, 0, 0.001, 1, 0, 0, 0, 1)),
                         "not perpendicular unit vectors"),
    "scaled direction": (make_with_geometry("scaled", direction=(2, 0, 0, 0, 2, 0, 0, 0, 2)),
                         "not perpendicular unit vectors"),
    "origin beyond float32": (make_with_geometry("far", origin=(1e300, 0, 0)), "unusable spacing"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_and_writes_nothing(kind, tmp_path, capsys):
    make, expected = BAD_INPUTS[kind]
    source = make(tmp_path)
    output = tmp_path / "out" / "result.seg.nrrd"
    code, err = run_cli(["segment", str(source), "-o", str(output), "--quiet"], capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert expected in err
    assert not output.exists() and not output.parent.exists()


def test_missing_input(tmp_path, capsys):
    code, err = run_cli(["segment", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o.seg.nrrd")], capsys)
    assert code == 2 and "Input not found" in err


def test_missing_model(tmp_path, capsys):
    output = tmp_path / "o.seg.nrrd"
    code, err = run_cli(["segment", str(SAMPLE_IMAGE), "-o", str(output), "--model", "no-such-model"], capsys)
    assert code == 2 and "No model 'no-such-model'" in err and "hippocampus-cnn" in err
    assert not output.exists()


def test_corrupted_weights_are_refused(model_copy, tmp_path, capsys):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    output = tmp_path / "o.seg.nrrd"
    code, err = run_cli(["segment", str(SAMPLE_IMAGE), "-o", str(output), "--model", str(model_copy)], capsys)
    assert code == 2 and "corrupted or was modified" in err
    assert not output.exists()


def test_unsupported_output_format_is_refused_before_work(tmp_path, capsys):
    code, err = run_cli(["segment", str(SAMPLE_IMAGE), "-o", str(tmp_path / "o.png")], capsys)
    assert code == 2 and ".seg.nrrd" in err
    assert list(tmp_path.iterdir()) == []


def test_output_never_overwrites_input(tmp_path, capsys):
    image = tmp_path / "volume.nii.gz"
    image.write_bytes(SAMPLE_IMAGE.read_bytes())
    code, err = run_cli(["segment", str(image), "-o", str(image)], capsys)
    assert code == 2 and "overwrite the input" in err
    assert image.read_bytes() == SAMPLE_IMAGE.read_bytes()


@pytest.mark.parametrize("field, value", [
    ("version", "1.0.0/../../../../tmp/escape"), ("id", "../escape"), ("weights.file", "/etc/passwd"),
    ("weights.file", "../model.safetensors"), ("version", 7)])
def test_card_names_that_could_leave_the_model_folder_are_refused(model_copy, tmp_path, capsys, field, value):
    import json

    card = json.loads((model_copy / "card.json").read_text(encoding="utf-8"))
    if field == "weights.file":
        card["weights"]["file"] = value
    else:
        card[field] = value
    (model_copy / "card.json").write_text(json.dumps(card), encoding="utf-8")
    output = tmp_path / "out.nii.gz"
    assert main(["segment", str(SAMPLE_IMAGE), "-o", str(output), "--model", str(model_copy), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1 and not output.exists()


def test_weights_linked_from_outside_the_model_folder_are_refused(model_copy, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    (model_copy / "model.safetensors").rename(outside)
    (model_copy / "model.safetensors").symlink_to(outside)
    output = tmp_path / "out.nii.gz"
    assert main(["segment", str(SAMPLE_IMAGE), "-o", str(output), "--model", str(model_copy), "--quiet"]) == 2
    assert "leads out of the model folder" in capsys.readouterr().err and not output.exists()


def label_variant(folder: Path, change) -> Path:
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABEL))).astype(np.float32)
    image = sitk.GetImageFromArray(change(values))
    image.CopyInformation(sitk.ReadImage(str(SAMPLE_LABEL)))
    path = folder / "label.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def almost_one(values):
    return np.where(values == 1, 0.999, values)


def with_nan(values):
    values[0, 0, 0] = np.nan
    return values


@pytest.mark.parametrize("change, extra, message", [
    (almost_one, [], "has values 0, 0.999, 2"),
    (with_nan, [], "NaN or infinite"),
    (None, ["--seed", "-1"], "seed must be a whole number"),
    (None, ["--labels", "one\nline", "two"], "plain text"),
    (None, ["--labels", *(f"s{n}" for n in range(300))], "at most 255 labels"),
])
def test_bad_fine_tune_input_is_refused_before_training(tmp_path, capsys, change, extra, message):
    label = label_variant(tmp_path, change) if change else SAMPLE_LABEL
    code, err = run_cli(["finetune", "--labeled", f"{SAMPLE_IMAGE}:{label}", "--steps", "2", "--device", "cpu",
                         "--quiet", *extra], capsys)
    assert code == 2 and err.startswith("error: ") and message in err
    assert not user_models_dir().exists() or not any(user_models_dir().iterdir())


def test_an_unusable_user_models_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """The folder the result would go to is a file: the error comes before a single training step."""
    blocker = tmp_path / "models"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv("HYBRIDMIM_USER_MODELS", str(blocker))
    code = main(["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--steps", "2", "--device", "cpu",
                 "--progress", "json"])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: Cannot use the user models folder")
    assert "is a file" in err
    assert '"step"' not in out and blocker.read_text(encoding="utf-8") == "not a folder"
