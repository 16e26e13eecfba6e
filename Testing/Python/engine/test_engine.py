"""Engine pieces on real data: DICOM series input, progress and cancellation, model folders and cards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BUNDLED_MODEL, SAMPLE_IMAGE
from hybridmim.cli import main
from hybridmim.errors import Cancelled, ChecksumError, InputImageError, ModelCardError
from hybridmim.imageio import read_volume
from hybridmim.inference import Segmenter, segment_file, tta_views, window_count
from hybridmim.model_card import ModelCard
from hybridmim.model_store import list_models, load_model, resolve_model, save_model
from hybridmim.networks import kept_window_masks, monai_default_attention
from hybridmim.progress import CancelToken


def write_dicom_series(image: sitk.Image, folder, series_uid: str = "1.2.826.0.1.3680043.2.1125.2",
                       prefix: str = "slice") -> None:
    """Write a CT-like DICOM series (one file per slice) with geometry tags, as scanners do."""
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 1000), sitk.sitkInt16)
    direction = image.GetDirection()
    series_tags = [("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                   ("0020|000e", series_uid), ("0008|103e", f"series {prefix}"),
                   ("0020|0037", "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])))]
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in series_tags:
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0028|0030", f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path):
    sample = read_volume(SAMPLE_IMAGE)
    write_dicom_series(sample, tmp_path)
    volume = read_volume(tmp_path)
    assert volume.GetSize() == sample.GetSize()
    assert np.allclose(volume.GetOrigin(), sample.GetOrigin(), atol=1e-4)
    assert np.allclose(volume.GetDirection(), sample.GetDirection(), atol=1e-5)
    output = segment_file(tmp_path, tmp_path / "out" / "labels.nii.gz", BUNDLED_MODEL, device="cpu")
    labels = sitk.ReadImage(str(output))
    assert labels.GetSize() == sample.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(labels))) == {0, 1, 2}


def test_volume_larger_than_the_available_memory_is_refused_before_reading(tmp_path, monkeypatch):
    """Files and DICOM series alike: judged from the header, so the reader never starts allocating."""
    import hybridmim.imageio as imageio

    sample = read_volume(SAMPLE_IMAGE)
    write_dicom_series(sample, tmp_path)
    voxels = int(np.prod(sample.GetSize()))
    monkeypatch.setattr(imageio, "available_memory", lambda: voxels * 4)  # less than the voxels plus working copies
    for source in (tmp_path, SAMPLE_IMAGE):
        with pytest.raises(InputImageError, match="GiB is available"):
            read_volume(source)
    monkeypatch.setattr(imageio, "available_memory", lambda: voxels * 16)
    assert read_volume(tmp_path).GetSize() == read_volume(SAMPLE_IMAGE).GetSize() == sample.GetSize()


def test_dicom_folder_with_two_series_lists_them_and_reads_the_chosen_one(tmp_path, capsys):
    sample = read_volume(SAMPLE_IMAGE)
    write_dicom_series(sample, tmp_path, "1.2.3.4.1", "first")
    write_dicom_series(sample[:, :, :20], tmp_path, "1.2.3.4.2", "second")
    with pytest.raises(InputImageError, match=r"holds 2 DICOM series: 1\.2\.3\.4\.1 \(32 files, series first\); "
                                              r"1\.2\.3\.4\.2 \(20 files, series second\)"):
        read_volume(tmp_path)
    assert read_volume(tmp_path, "1.2.3.4.2").GetSize() == (*sample.GetSize()[:2], 20)
    with pytest.raises(InputImageError, match="has no DICOM series 9.9"):
        read_volume(tmp_path, "9.9")
    output = tmp_path / "labels.nii.gz"
    assert main(["segment", str(tmp_path), "-o", str(output), "--series", "1.2.3.4.1", "--quiet"]) == 0
    assert sitk.ReadImage(str(output)).GetSize() == sample.GetSize()


@pytest.mark.parametrize("damage, message", [
    ("missing", "are 2.000 mm apart where the series is 1.000 mm apart"),
    ("duplicate", "are at the same position"),
])
def test_dicom_series_with_a_missing_or_duplicated_slice_is_refused_naming_it(tmp_path, damage, message):
    sample = read_volume(SAMPLE_IMAGE)
    write_dicom_series(sample, tmp_path)
    if damage == "missing":
        (tmp_path / "slice010.dcm").unlink()
    else:
        shutil.copy(tmp_path / "slice010.dcm", tmp_path / "slice010b.dcm")
        header = sitk.ReadImage(str(tmp_path / "slice010b.dcm"))
        header.SetMetaData("0008|0018", "1.2.826.0.1.3680043.2.1125.99")  # another instance at the same place
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(tmp_path / "slice010b.dcm"))
        writer.Execute(header)
    with pytest.raises(InputImageError, match=message) as error:
        read_volume(tmp_path)
    assert "slice009.dcm" in str(error.value) or "slice010" in str(error.value)


def test_folder_without_dicom_is_an_input_error(tmp_path):
    from hybridmim.errors import InputImageError

    with pytest.raises(InputImageError, match="No DICOM series"):
        read_volume(tmp_path)


def test_progress_reaches_one_and_never_goes_back(segmenter):
    seen = []
    segmenter.segment(read_volume(SAMPLE_IMAGE), lambda fraction, message: seen.append(fraction))
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 3


def test_window_count_matches_monai_calls():
    """The progress total equals the number of windows sliding-window inference actually runs."""
    calls = []
    network = torch.nn.Conv3d(1, 3, 1)

    def predictor(x):
        calls.append(x.shape[0])
        return network(x)

    from monai.inferers import sliding_window_inference

    for shape, roi, overlap in [((35, 50, 35), (48, 64, 48), 0.25), ((100, 70, 30), (32, 32, 16), 0.5),
                                ((64, 64, 64), (64, 32, 48), 0.25)]:
        calls.clear()
        sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, predictor, overlap=overlap)
        assert len(calls) == window_count(shape, roi, overlap)


def test_cancel_stops_the_run_and_writes_nothing(tmp_path):
    token = CancelToken()

    def cancel_on_first_report(fraction: float, message: str) -> None:
        if fraction > 0:
            token.cancel()

    output = tmp_path / "labels.seg.nrrd"
    big = sitk.Expand(read_volume(SAMPLE_IMAGE), [2, 2, 2])  # several windows, so cancellation lands mid-run
    sitk.WriteImage(big, str(tmp_path / "big.nrrd"))
    with pytest.raises(Cancelled):
        segment_file(tmp_path / "big.nrrd", output, BUNDLED_MODEL, "cpu", cancel_on_first_report, token)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nrrd"]


def test_gpu_out_of_memory_halves_the_window_batch_then_moves_to_the_cpu(segmenter, monkeypatch):
    """Fault injection: every 'GPU' call runs out of memory. The segmenter retries with 4, 2, 1 windows per call,
    then finishes on the CPU with the labels of a plain CPU run, saying what it did; the next volume starts on the
    GPU again with the full window batch (one large volume must not keep a long session on the CPU)."""
    volume = read_volume(SAMPLE_IMAGE)
    expected = sitk.GetArrayFromImage(segmenter.segment(volume))
    fallback = Segmenter(segmenter.model, "cpu", sw_batch_size=8)
    fallback.device = torch.device("cuda")  # pretend; the injected failure stands in for CUDA
    network = fallback.model.network
    moves = []
    monkeypatch.setattr(network, "to", lambda device: moves.append(torch.device(device).type) or network)
    real = Segmenter.predict_probabilities
    attempts = []

    def out_of_memory_on_gpu(self, *args, device, window_batch, **kwargs):
        attempts.append((device.type, window_batch))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("injected")
        return real(self, *args, device=device, window_batch=window_batch, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_probabilities", out_of_memory_on_gpu)
    messages = []
    labels = fallback.segment(volume, lambda fraction, message: messages.append(message))
    assert attempts == [("cuda", 8), ("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 4)]
    assert sum("out of memory" in message for message in messages) == 4
    assert "continuing on the CPU" in messages[messages.index("preprocessing") + 4]
    assert np.array_equal(sitk.GetArrayFromImage(labels), expected)
    assert moves == ["cpu", "cuda"] and fallback.device.type == "cuda" and fallback.sw_batch_size == 8
    fallback.segment(volume)
    assert attempts[5:] == attempts[:5]  # the next volume tried the GPU with 8 windows first again


def test_window_batch_does_not_change_the_labels(segmenter):
    volume = sitk.Expand(read_volume(SAMPLE_IMAGE), [2, 2, 1])  # several windows
    batched = sitk.GetArrayFromImage(Segmenter(segmenter.model, "cpu", sw_batch_size=4).segment(volume))
    single = sitk.GetArrayFromImage(Segmenter(segmenter.model, "cpu", sw_batch_size=1).segment(volume))
    assert (batched == single).mean() > 0.9999 and len(np.unique(single)) == 3


def test_window_batch_comes_from_the_card_unless_given(model_copy):
    card = json.loads((model_copy / "card.json").read_text(encoding="utf-8"))
    card["inference"] = {"window_batch": 2}
    (model_copy / "card.json").write_text(json.dumps(card), encoding="utf-8")
    assert Segmenter(model_copy, "cpu").sw_batch_size == 2
    assert Segmenter(model_copy, "cpu", sw_batch_size=3).sw_batch_size == 3
    assert Segmenter("la-swin", "cpu").sw_batch_size == 1  # measured: batches only cost a SwinUNETR memory


def test_fast_attention_keeps_the_swinunetr_labels():
    """SwinUNETRs run fused attention with kept window masks; on a real case that gives the labels of MONAI's
    default attention."""
    from monai.networks.nets import swin_unetr

    plain_mask = swin_unetr.compute_mask
    segmenter = Segmenter("hippocampus-swin", "cpu")
    volume = sitk.Expand(read_volume(SAMPLE_IMAGE), [2, 2, 1])  # several windows
    flags = [m.use_flash_attention for m in segmenter.model.network.modules() if hasattr(m, "use_flash_attention")]
    fast = sitk.GetArrayFromImage(segmenter.segment(volume))
    kept = kept_window_masks(segmenter.model.network)
    with monai_default_attention(segmenter.model.network):
        assert kept_window_masks(segmenter.model.network) is None
        plain = sitk.GetArrayFromImage(segmenter.segment(volume))
    assert flags and all(flags) and kept.hits > 0
    assert swin_unetr.compute_mask is plain_mask  # MONAI's module is never patched
    assert (fast == plain).mean() > 0.9999 and len(np.unique(plain)) == 3


def test_bundled_model_is_listed_and_resolves_by_id():
    models = {m.card.id: m for m in list_models()}
    assert models["hippocampus-cnn"].bundled
    assert resolve_model("hippocampus-cnn") == BUNDLED_MODEL


def test_card_missing_fields_is_a_clear_error(model_copy):
    card = json.loads((model_copy / "card.json").read_text(encoding="utf-8"))
    del card["labels"]
    (model_copy / "card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelCardError, match="missing field.*labels"):
        load_model(model_copy)


@pytest.mark.parametrize("inference,message", [({"blend": "median"}, "blend"), ({"overlap": 1.0}, "overlap"),
                                               ({"window_batch": 0}, "window_batch"),
                                               ({"window_batch": 2.5}, "window_batch"),
                                               ({"largest_component": [3]}, "largest_component"),
                                               ({"largest_component": 1}, "largest_component")])
def test_card_with_unusable_inference_settings_is_refused(model_copy, inference, message):
    card = json.loads((model_copy / "card.json").read_text(encoding="utf-8"))
    card["inference"] = inference
    (model_copy / "card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelCardError, match=message):
        load_model(model_copy)


def test_swapped_weights_file_is_refused(model_copy, tmp_path):
    """A valid safetensors file that is not the one the card names is still refused (checksum first)."""
    loaded = load_model(model_copy)
    other = save_model(tmp_path / "other", torch.nn.Conv3d(1, 1, 1), loaded.card)
    (model_copy / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ChecksumError):
        load_model(model_copy)


def test_fp16_storage_halves_the_file_and_keeps_the_labels(segmenter, tmp_path):
    card = ModelCard.load(BUNDLED_MODEL)
    half = save_model(tmp_path / "half", segmenter.model.network, card, half=True)
    assert (half / "model.safetensors").stat().st_size < 0.55 * (BUNDLED_MODEL / "model.safetensors").stat().st_size
    volume = read_volume(SAMPLE_IMAGE)
    full_labels = sitk.GetArrayFromImage(segmenter.segment(volume))
    half_labels = sitk.GetArrayFromImage(Segmenter(half, "cpu").segment(volume))
    assert (full_labels == half_labels).mean() > 0.999


def test_save_model_refuses_to_overwrite(model_copy):
    loaded = load_model(model_copy)
    with pytest.raises(FileExistsError):
        save_model(model_copy, loaded.network, loaded.card)


def test_test_time_flips_from_the_card_are_applied(segmenter, model_copy):
    """A card asking for flip test-time augmentation runs the windows once per view and agrees with the plain run."""
    card = json.loads((model_copy / "card.json").read_text(encoding="utf-8"))
    card["inference"]["tta_flip_axes"] = [0]
    (model_copy / "card.json").write_text(json.dumps(card), encoding="utf-8")
    volume = read_volume(SAMPLE_IMAGE)
    messages = []
    augmented = Segmenter(model_copy, "cpu").segment(volume, lambda fraction, message: messages.append(message))
    assert "window batch 2/2" in messages  # the sample fits one window: two views, two batches
    plain = segmenter.segment(volume)
    assert (sitk.GetArrayFromImage(augmented) == sitk.GetArrayFromImage(plain)).mean() > 0.98


def test_test_time_rotations_undo_themselves_and_are_applied(segmenter, model_copy):
    """Each rotation view's inverse restores the volume (odd sides too); a card asking for rotations about the
    slice axis runs four views, turning its 48 x 64 patch with the volume, and agrees with the plain run."""
    volume = torch.arange(2 * 5 * 6 * 7, dtype=torch.float32).reshape(1, 2, 5, 6, 7)
    views = tta_views({"tta_flip_axes": [1], "tta_rot90_axis": 2})
    assert len(views) == 5
    for view, back in views:
        assert torch.equal(back(view(volume)), volume)
    assert all(not torch.equal(view(volume), volume) for view, _ in views[1:])
    assert views[2][0](volume).shape == (1, 2, 6, 5, 7)  # a quarter turn in the plane of axes 0 and 1
    assert torch.equal(views[3][0](volume), volume.flip([2, 3]))  # a half turn: both plane axes reversed
    assert torch.equal(views[2][0](volume)[0, 0, :, :, 0], volume[0, 0, :, :, 0].rot90())
    card = json.loads((model_copy / "card.json").read_text(encoding="utf-8"))
    card["inference"]["tta_rot90_axis"] = 2  # the sample model's grid is 1 x 1 x 1 mm
    (model_copy / "card.json").write_text(json.dumps(card), encoding="utf-8")
    image = read_volume(SAMPLE_IMAGE)
    messages = []
    rotated = Segmenter(model_copy, "cpu").segment(image, lambda fraction, message: messages.append(message))
    assert "window batch 4/4" in messages
    assert (sitk.GetArrayFromImage(rotated) == sitk.GetArrayFromImage(segmenter.segment(image))).mean() > 0.97


def test_upsampling_beyond_memory_is_refused_for_segment_and_fine_tune(tmp_path, monkeypatch):
    """A coarse volume grows on the model's 1 mm grid (3 mm voxels: 27 times the voxels); segmenting and fine-tuning
    alike refuse it before allocating when the arrays on that grid cannot fit."""
    import hybridmim.preprocessing as preprocessing
    from hybridmim.cases import load_case

    coarse = sitk.Image([64, 64, 64], sitk.sitkInt16)
    coarse.SetSpacing((3.0, 3.0, 3.0))
    monkeypatch.setattr(preprocessing, "available_memory", lambda: 100 * 2**20)  # 192^3 x 6 floats is ~160 MiB
    segmenter = Segmenter(BUNDLED_MODEL, "cpu")
    for attempt in (lambda: segmenter.segment(coarse), lambda: load_case(segmenter.card, coarse)):
        with pytest.raises(InputImageError, match=r"192x192x192 voxels, about 0\.2 GiB of working memory"):
            attempt()
    monkeypatch.setattr(preprocessing, "available_memory", lambda: 2**30)
    assert load_case(segmenter.card, coarse).image.shape[1:] == (192, 192, 192)
