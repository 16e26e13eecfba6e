"""Fine-tuning through the engine on real volumes: it learns, it versions, it refuses bad input, it never touches
bundled models, and a cancelled run leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BUNDLED_MODEL, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.cli import main
from hybridmim.errors import Cancelled, HybridMIMError
from hybridmim.finetune import fine_tune
from hybridmim.inference import Segmenter
from hybridmim.metrics import dice_per_label
from hybridmim.model_card import ModelCard
from hybridmim.model_store import (
    active_versions,
    model_versions,
    resolve_model,
    set_active_version,
    sha256_of,
    user_models_dir,
)
from hybridmim.networks import output_layer_names
from hybridmim.semisupervised import copy_paste, ema_update, pseudo_labels, weighted_dice_ce
from hybridmim.settings import TrainSettings, settings_from


def la_case(shared_data: Path, index: int) -> tuple[Path, Path]:
    dataset = json.loads((shared_data / "la" / "dataset.json").read_text(encoding="utf-8"))
    entry = sorted(dataset["training"], key=lambda e: e["image"])[index]
    return shared_data / "la" / entry["image"], shared_data / "la" / entry["label"]


def dice_on(model, image: Path, label: Path) -> float:
    predicted = Segmenter(model, "cpu").segment(sitk.ReadImage(str(image)))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    return dice_per_label(sitk.GetArrayFromImage(predicted), reference, [1])[1]


def bundled_fingerprint() -> dict[str, str]:
    return {str(p.relative_to(BUNDLED_MODEL)): sha256_of(p) for p in sorted(BUNDLED_MODEL.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_new_structure_learned_from_two_volumes_and_bundled_model_untouched(shared_data):
    """Interactive scenario: the bundled hippocampus model learns the left atrium (a new label set, so a new output
    layer) from two labelled volumes plus an unlabelled one with the automatic method (supervised for two); Dice on
    a held-out volume rises from the starting model's to a usable level."""
    before = bundled_fingerprint()
    held_out = [la_case(shared_data, i) for i in range(40, 44)]
    start_dice = np.mean([dice_on("hippocampus-cnn", *case) for case in held_out])
    reports = []
    settings = settings_from(steps=400, labeled=2, unlabeled=1, validate_every=200)
    folder = fine_tune("hippocampus-cnn", [la_case(shared_data, 0), la_case(shared_data, 1)],
                       [la_case(shared_data, 2)[0]], settings, validation=held_out, label_names=["left atrium"],
                       device="cpu", progress=reports.append)
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    assert folder.parent == user_models_dir()
    assert card["id"] == "hippocampus-cnn-left-atrium" and card["version"] == "1.0.0-ft.1"
    assert card["training"]["output_layer"] == "re-made" and card["training"]["method"] == "supervised"
    assert card["training"]["parent"] == {"id": "hippocampus-cnn", "version": "2.0.0",
                                          "sha256": json.loads((BUNDLED_MODEL / "card.json").read_text(
                                              encoding="utf-8"))["weights"]["sha256"]}
    assert [label["name"] for label in card["labels"]] == ["left atrium"]
    assert card["inference"]["largest_component"] == [1]  # one piece in both corrected volumes (the parent: [1, 2])
    final_dice = np.mean([dice_on(folder, *case) for case in held_out])
    assert card["metrics"]["dice"]["left atrium"] == pytest.approx(final_dice, abs=1e-3)
    assert final_dice > 0.5 and final_dice > start_dice + 0.3, (start_dice, final_dice)
    assert [r.step for r in reports] == list(range(1, 401))
    assert [r.step for r in reports if r.validation_dice is not None] == [200, 400]
    assert reports[-1].validation_dice is not None and reports[-1].validation_dice > 0.5
    assert resolve_model("hippocampus-cnn-left-atrium") == folder
    assert bundled_fingerprint() == before


def test_versions_and_revert(shared_data, tmp_path):
    """Same labels keep the id: each fine-tune is a new active version; revert goes back to any of them."""
    pair = (SAMPLE_IMAGE, SAMPLE_LABEL)
    settings = settings_from("supervised", steps=3)
    first = fine_tune("hippocampus-cnn", [pair], settings=settings, device="cpu")
    second = fine_tune(first, [pair], settings=settings_from("supervised", steps=3), device="cpu")
    versions = [v.card.version for v in model_versions("hippocampus-cnn")]
    assert versions == ["2.0.0", "2.0.0-ft.1", "2.0.0-ft.2"]
    assert resolve_model("hippocampus-cnn") == second
    assert json.loads((second / "card.json").read_text(encoding="utf-8"))["training"]["parent"]["version"] \
        == "2.0.0-ft.1"
    set_active_version("hippocampus-cnn", "2.0.0")
    assert resolve_model("hippocampus-cnn") == BUNDLED_MODEL.resolve() or \
        resolve_model("hippocampus-cnn").samefile(BUNDLED_MODEL)
    assert active_versions() == {"hippocampus-cnn": "2.0.0"}
    with pytest.raises(HybridMIMError, match="no version '9.9'"):
        set_active_version("hippocampus-cnn", "9.9")
    assert main(["revert", "hippocampus-cnn", "2.0.0-ft.1"]) == 0
    assert resolve_model("hippocampus-cnn") == first


def test_cancel_leaves_no_version(tmp_path):
    from hybridmim.progress import CancelToken

    token = CancelToken()

    def cancel_at_step_3(report) -> None:
        if report.step == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        fine_tune("hippocampus-cnn", [(SAMPLE_IMAGE, SAMPLE_LABEL)], settings=settings_from("supervised", steps=50),
                  device="cpu", progress=cancel_at_step_3, cancel=token)
    root = user_models_dir()
    assert not root.exists() or list(root.iterdir()) == []
    assert [v.card.version for v in model_versions("hippocampus-cnn")] == ["2.0.0"]


def write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("problem, message", [
    ("geometry", "does not have the geometry"),
    ("empty", "is empty"),
    ("values", "values 0, 1, 2, 3;"),
    ("no-unlabelled", "needs unlabelled volumes"),
    ("no-budget", "budget"),
])
def test_bad_fine_tuning_input_is_refused_and_nothing_written(problem, message, tmp_path):
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABEL)))
    label_path, settings, unlabeled = SAMPLE_LABEL, settings_from("supervised", steps=2), []
    if problem == "geometry":
        shifted = sitk.ReadImage(str(SAMPLE_LABEL))
        shifted.SetOrigin([o + 5 for o in shifted.GetOrigin()])
        label_path = tmp_path / "shifted.nii.gz"
        sitk.WriteImage(shifted, str(label_path))
    elif problem == "empty":
        label_path = write_like(np.zeros_like(labels), image, tmp_path / "empty.nii.gz")
    elif problem == "values":
        values = labels.copy()
        values[0, 0, 0] = 3
        label_path = write_like(values.astype(np.uint8), image, tmp_path / "three.nii.gz")
    elif problem == "no-unlabelled":
        settings = settings_from("bcp", steps=2)
    elif problem == "no-budget":
        settings = TrainSettings(method="supervised")
    with pytest.raises(HybridMIMError, match=message):
        fine_tune("hippocampus-cnn", [(SAMPLE_IMAGE, label_path)], unlabeled, settings, device="cpu")
    assert not user_models_dir().exists() or list(user_models_dir().iterdir()) == []


def test_cli_finetune_then_versions(tmp_path, capsys):
    code = main(["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--steps", "3", "--device", "cpu",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "hippocampus-cnn 2.0.0-ft.1" in out
    assert main(["versions", "hippocampus-cnn"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("  2.0.0 ") and listing[1].startswith("* 2.0.0-ft.1")
    with pytest.raises(SystemExit):  # argparse: not IMAGE:LABEL
        main(["finetune", "--labeled", f"{SAMPLE_IMAGE}", "--steps", "3"])
    code = main(["finetune", "--labeled", f"{SAMPLE_IMAGE}:{tmp_path / 'missing.nii.gz'}", "--steps", "3",
                 "--device", "cpu", "--quiet"])
    assert code == 2 and "error:" in capsys.readouterr().err
    code = main(["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--steps", "3", "--learning-rate", "0",
                 "--device", "cpu", "--quiet"])
    assert code == 2 and "learning rate must be positive" in capsys.readouterr().err
    assert [v.card.version for v in model_versions("hippocampus-cnn")] == ["2.0.0", "2.0.0-ft.1"]


@pytest.mark.slow
def test_same_labels_fine_tune_reports_the_starting_models_dice(shared_data, capsys):
    """With validation volumes and the output layer kept, the card and the command line put the new Dice next to
    the starting model's on the same volumes, measured with the engine's own inference."""
    validation = la_case(shared_data, 5)
    start = dice_on("la-cnn", *validation)
    code = main(["finetune", "--model", "la-cnn", "--labeled", ":".join(map(str, la_case(shared_data, 3))),
                 "--validation", ":".join(map(str, validation)), "--steps", "2", "--learning-rate", "1e-4",
                 "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    card = json.loads((resolve_model("la-cnn") / "card.json").read_text(encoding="utf-8"))
    assert code == 0 and card["metrics"]["starting_model_dice"]["mean"] == pytest.approx(start, abs=1e-4)
    assert card["training"]["settings"]["learning_rate"] == 1e-4
    before, after = card["metrics"]["starting_model_dice"]["mean"], card["metrics"]["dice"]["mean"]
    assert f"(starting model {before:.3f}, {after - before:+.3f})" in out
    assert ("Lower than the starting model" in out) == (after < before)


def test_copy_paste_keeps_every_corrected_voxel():
    """Wherever a voxel comes from the labelled volume, its reference label and its weight in the labelled loss win,
    whatever the teacher says; pasted voxels carry the teacher's label in the pseudo-label loss, where it is sure."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 1, 8, 8, 8)
    images, unlabeled = torch.zeros(shape), torch.ones(shape)
    labels = torch.randint(0, 3, shape, generator=generator)
    teacher = (labels + 1) % 3  # disagrees everywhere
    confident = (torch.rand(shape, generator=generator) > 0.5).float()
    region = torch.zeros((1, 1, 8, 8, 8), dtype=torch.bool)
    region[..., 2:6, 2:6, 2:6] = True
    mixed, mixed_labels, labelled, pasted = copy_paste(images, labels, torch.ones(shape), unlabeled, teacher,
                                                       confident, region)
    outside = ~region.expand(shape)
    assert torch.equal(mixed_labels[outside], labels[outside]) and bool((labelled[outside] == 1).all())
    assert bool((mixed[outside] == 0).all()) and bool((mixed[~outside] == 1).all())
    assert torch.equal(mixed_labels[~outside], teacher[~outside])
    assert bool((labelled[~outside] == 0).all()) and bool((pasted[outside] == 0).all())
    assert torch.equal(pasted[~outside], confident[~outside])


def test_weighted_loss_ignores_zero_weight_voxels_and_pseudo_labels_threshold():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 6, 6, 6, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (1, 1, 6, 6, 6), generator=generator)
    weights = torch.zeros(1, 1, 6, 6, 6)
    weights[..., :3] = 1
    changed = labels.clone()
    changed[..., 3:] = (changed[..., 3:] + 1) % 3
    assert weighted_dice_ce(logits, labels, weights).item() == pytest.approx(
        weighted_dice_ce(logits, changed, weights).item())
    zero = weighted_dice_ce(logits, labels, torch.zeros_like(weights))
    zero.backward()
    assert zero.item() == 0.0
    confident_logits = torch.zeros(1, 2, 1, 1, 2)
    confident_logits[0, 1, 0, 0, 0] = 5.0  # p = 0.993 for class 1; the other voxel is a coin toss
    pseudo, mask = pseudo_labels(confident_logits, 0.8)
    assert pseudo.flatten().tolist() == [1, 0] and mask.flatten().tolist() == [1.0, 0.0]


def test_single_piece_pseudo_labels_keep_the_largest_piece_of_one_piece_structures_only():
    """BCP's pseudo-label rule: a one-piece structure's stray island becomes background; a structure that may be
    several pieces keeps them all; with threshold 0 every voxel counts."""
    logits = torch.zeros(1, 3, 12, 12, 12)
    logits[0, 0] = 1.0
    logits[0, 1, 1:5, 1:5, 1:5] = 3.0  # label 1: a 4^3 cube...
    logits[0, 1, 8:10, 8:10, 8:10] = 3.0  # ...and a 2^3 island
    logits[0, 2, 1:3, 8:11, 1:3] = 3.0  # label 2: two pieces, both kept
    logits[0, 2, 8:10, 1:3, 8:10] = 3.0
    labels, confident = pseudo_labels(logits, 0.0, single_piece=[1])
    assert int((labels == 1).sum()) == 64 and int(labels[0, 0, 8, 8, 8]) == 0
    assert int((labels == 2).sum()) == 12 + 8 and bool((confident == 1).all())
    plain, _ = pseudo_labels(logits, 0.0)
    assert int((plain == 1).sum()) == 72


def test_bcp_recipe_and_labelled_copy_paste_warmup(monkeypatch):
    """settings_from gives BCP its published pseudo-label rule unless overridden; its supervised phase trains on
    pairs of labelled patches with a box swapped between them, labels and weights alike."""
    from hybridmim.methods import LabelledBatch, get_method

    settings = settings_from("bcp", steps=10, labeled=1, unlabeled=1)
    assert settings.confidence == 0.0 and settings.single_piece_pseudo_labels
    assert settings_from("bcp", steps=10, labeled=1, unlabeled=1, confidence=0.9).confidence == 0.9
    assert settings_from("mean-teacher", steps=10, labeled=1, unlabeled=1).confidence == 0.8
    images = torch.stack([torch.zeros(1, 8, 8, 8), torch.ones(1, 8, 8, 8)])
    labels = torch.stack([torch.zeros(1, 8, 8, 8), torch.ones(1, 8, 8, 8)]).long()
    weights = torch.stack([torch.ones(1, 8, 8, 8), torch.zeros(1, 8, 8, 8)])
    seen = {}
    import hybridmim.semisupervised as semisupervised

    original = semisupervised.weighted_dice_ce

    def spy(logits, mixed_labels, mixed_weights):
        seen.update(labels=mixed_labels, weights=mixed_weights)
        return original(logits, mixed_labels, mixed_weights)

    monkeypatch.setattr(semisupervised, "weighted_dice_ce", spy)
    inputs = []
    network = torch.nn.Conv3d(1, 2, 1)
    network.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    losses = get_method("bcp").warmup(network, LabelledBatch(images, labels, weights, settings,
                                                             torch.Generator().manual_seed(0)))
    assert set(losses) == {"supervised"} and losses["supervised"].requires_grad
    mixed = inputs[0]
    box = mixed[0, 0] == 1  # patch 0 (zeros) holds a box of patch 1 (ones), patch 1 the same box of patch 0
    assert 0 < int(box.sum()) < box.numel() and torch.equal(mixed[1, 0] == 0, box)
    assert torch.equal(seen["labels"][:, 0].float(), mixed[:, 0]) and torch.equal(seen["weights"], 1 - mixed)


def test_ema_teacher_moves_towards_student():
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(0.0)
        student.weight.fill_(1.0)
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full_like(teacher.weight, 0.1))


@pytest.mark.slow
def test_minutes_budget_stops_on_time():
    """The run ends at the first step boundary after the budget: it overshoots by a few steps' time at most."""
    settings = settings_from("supervised", minutes=0.1)  # 6 seconds
    folder = fine_tune("hippocampus-cnn", [(SAMPLE_IMAGE, SAMPLE_LABEL)], settings=settings, device="cpu")
    training = json.loads((folder / "card.json").read_text(encoding="utf-8"))["training"]
    seconds, steps = training["time_seconds"], training["steps"]
    assert steps >= 2 and seconds >= 5.9
    assert seconds - 6 < max(2.0, 5 * seconds / steps)  # a few steps: generous for a shared CPU


def test_the_plan_is_made_once_without_torch_and_says_what_will_be_made():
    """The Slicer module's process never imports torch: the plan (model, new card, settings) is made there."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; from hybridmim.finetune_plan import plan_fine_tune; "
            "p = plan_fine_tune('hippocampus-cnn', 1, 1, label_names=['whole hippocampus']); "
            "print(p.card.id, p.remake_head, p.settings.method, p.settings.steps, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "HybridMIMSegment")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["hippocampus-cnn-whole-hippocampus", "True", "bcp", "3000", "False"]


def test_a_run_refuses_volumes_its_plan_was_not_made_for():
    from hybridmim.finetune import run_fine_tune
    from hybridmim.finetune_plan import plan_fine_tune

    plan = plan_fine_tune("hippocampus-cnn", 1, 0, settings_from("supervised", steps=1))
    with pytest.raises(HybridMIMError, match="plan was made for 1 labelled and 0 unlabelled"):
        run_fine_tune(plan, [(SAMPLE_IMAGE, SAMPLE_LABEL)] * 2, device="cpu")
    assert not user_models_dir().exists() or not any(user_models_dir().iterdir())


CHAOS_LABELS = ["liver", "right kidney", "left kidney", "spleen"]


def chaos_case(shared_data: Path, index: int) -> tuple[Path, Path]:
    entry = json.loads((shared_data / "chaos_t2" / "dataset.json").read_text(encoding="utf-8"))["training"][index]
    return shared_data / "chaos_t2" / entry["image"], shared_data / "chaos_t2" / entry["label"]


def test_new_structure_on_thick_slices_gets_a_plan_from_its_volumes(shared_data):
    """Fine-tuning to CHAOS abdominal MRI (1.25 x 1.25 x 7.7 mm) plans spacing, patch and pooling from the user's
    volumes instead of copying the start's 1 mm isotropic grid (7.7 times upsampling along the slices): from the
    pretrained BasicUNet (fixed pooling: patch sides multiples of 16, its normalisation kept) and from la-cnn's UNet
    (pooling planned per axis; every weight but the output layer's kept). Results land on the input's grid."""
    settings = settings_from("supervised", steps=2)
    pretrained = fine_tune("hybridmim-cnn-pretrained", [chaos_case(shared_data, 0)], settings=settings,
                           label_names=CHAOS_LABELS, device="cpu")
    card = ModelCard.load(pretrained)
    assert card.target_spacing[2] == pytest.approx(7.7) and card.target_spacing[0] < 7.7 / 2
    assert all(p % 16 == 0 for p in card.patch_size) and np.prod(card.patch_size) <= 48 ** 3
    assert card.intensity.method == "auto" and card.training["plan"]["reasons"]

    unet = fine_tune("la-cnn", [chaos_case(shared_data, 1)], unlabeled=[chaos_case(shared_data, 2)[0]],
                     settings=settings_from("supervised", steps=2), label_names=CHAOS_LABELS, device="cpu")
    card = ModelCard.load(unet)
    assert card.target_spacing[2] == pytest.approx(7.7)
    assert card.architecture["args"]["strides"][0] == [2, 2, 1]  # in-plane first: the slices are 7.7 mm
    head = output_layer_names("unet", 1, 5, **card.architecture["args"])
    assert set(card.training["fresh_weights"]) == set(head)
    image = sitk.ReadImage(str(chaos_case(shared_data, 3)[0]))
    labels = Segmenter(unet, "cpu").segment(image)
    assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
    assert labels.GetDirection() == image.GetDirection() and labels.GetOrigin() == image.GetOrigin()


def test_a_linear_probe_trains_the_output_layer_alone(shared_data):
    """``head_only`` (the linear probe of the pre-training evidence): la-cnn's UNet learns CHAOS's four labels in a
    re-made output layer while every other weight stays exactly as it started."""
    from hybridmim.model_store import read_weights

    settings = settings_from("supervised", steps=3, head_only=True)
    folder = fine_tune("la-cnn", [chaos_case(shared_data, 1)], settings=settings, label_names=CHAOS_LABELS,
                       device="cpu")
    card = ModelCard.load(folder)
    head = output_layer_names("unet", 1, 5, **card.architecture["args"])
    _, _, start = read_weights(resolve_model("la-cnn"))
    _, _, probed = read_weights(folder)
    kept = [name for name in probed if name not in head]
    assert kept and all(torch.equal(probed[name].float(), start[name].float()) for name in kept)
    fresh = [name for name in head if name.endswith("weight")]
    torch.manual_seed(settings.seed)  # the output layer as the run made it, before training
    from hybridmim.networks import build_network

    made = build_network("unet", 1, 5, **card.architecture["args"]).state_dict()
    assert fresh and any(not torch.equal(probed[name].float(), made[name].float()) for name in fresh)
    assert card.training["settings"]["head_only"] is True
