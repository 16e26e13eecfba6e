"""Training resumes exactly: a run interrupted after a checkpoint and resumed ends with the same weights as an
uninterrupted one, for every fine-tuning method (optimiser, EMA teacher, samplers and every random state)."""

from __future__ import annotations

import pytest
import torch

from conftest import BUNDLED_MODEL, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.cases import load_case
from hybridmim.errors import Cancelled, HybridMIMError
from hybridmim.methods import METHODS
from hybridmim.model_card import ModelCard
from hybridmim.networks import build_network
from hybridmim.progress import CancelToken
from hybridmim.settings import TrainSettings, settings_from
from hybridmim.trainer import Checkpoint, train_network


def train(card, cases, settings, checkpoint=None, stop_after=None):
    torch.manual_seed(0)
    network = build_network(card.architecture["name"], card.in_channels, card.out_channels,
                            **card.architecture.get("args", {}))
    cancel = CancelToken()
    steps = []

    def progress(report):
        steps.append(report.step)
        if stop_after is not None and report.step == stop_after:
            cancel.cancel()  # the run is killed here: the last checkpoint is what survives

    labeled, unlabeled = cases
    train_network(network, labeled, unlabeled, card.patch_size, settings, torch.device("cpu"), progress=progress,
                  cancel=cancel, checkpoint=checkpoint)
    return network.state_dict(), steps


@pytest.mark.parametrize("method", METHODS)  # every registered method
@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, method):
    card = ModelCard.load(BUNDLED_MODEL)
    cases = ([load_case(card, SAMPLE_IMAGE, SAMPLE_LABEL)],
             [load_case(card, SAMPLE_IMAGE)] if method != "supervised" else [])
    # settings_from: each method with its recipe (BCP: labelled copy-paste, largest-piece pseudo-labels)
    settings = settings_from(method, steps=7, warmup_steps=2, supervised_fraction=0.3, spatial_probability=0.5,
                             rotation_degrees=10, scale_range=[0.9, 1.1])
    uninterrupted, steps = train(card, cases, settings)
    assert steps == [1, 2, 3, 4, 5, 6, 7]

    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", every=2)
    with pytest.raises(Cancelled):
        train(card, cases, settings, checkpoint, stop_after=5)  # checkpoint at step 4 survives
    assert checkpoint.path.is_file() and not list(tmp_path.glob("*.partial"))
    resumed, steps = train(card, cases, settings, Checkpoint(checkpoint.path, every=2, resume=True))
    assert steps == [5, 6, 7]  # continued, not started again
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    settings.seed = 1
    fresh, _ = train(card, cases, settings)
    assert not all(torch.equal(uninterrupted[k], fresh[k]) for k in uninterrupted)  # the check can fail


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    card = ModelCard.load(BUNDLED_MODEL)
    cases = ([load_case(card, SAMPLE_IMAGE, SAMPLE_LABEL)], [])
    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", every=1)
    with pytest.raises(Cancelled):
        train(card, cases, TrainSettings(steps=4), checkpoint, stop_after=2)
    with pytest.raises(HybridMIMError, match="other settings"):
        train(card, cases, TrainSettings(steps=4, learning_rate=1e-4), Checkpoint(checkpoint.path, resume=True))


def test_a_checkpoint_of_another_model_layout_is_refused_and_new_settings_take_their_defaults(tmp_path):
    """A plan made again from changed data (another patch or spacing) must not continue an older run's weights;
    a checkpoint written before a setting existed resumes as that setting's default."""
    card = ModelCard.load(BUNDLED_MODEL)
    cases = ([load_case(card, SAMPLE_IMAGE, SAMPLE_LABEL)], [])
    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", every=1, model=card.layout())
    with pytest.raises(Cancelled):
        train(card, cases, TrainSettings(steps=4), checkpoint, stop_after=2)
    other = {**card.layout(), "patch_size": [32, 32, 32]}
    with pytest.raises(HybridMIMError, match="another model layout"):
        train(card, cases, TrainSettings(steps=4), Checkpoint(checkpoint.path, resume=True, model=other))
    state = torch.load(checkpoint.path, weights_only=True)
    del state["settings"]["rotation_axes"]  # as written before rotation_axes existed
    torch.save(state, checkpoint.path)
    _, steps = train(card, cases, TrainSettings(steps=4), Checkpoint(checkpoint.path, resume=True,
                                                                     model=card.layout()))
    assert steps == [3, 4]


def test_resume_without_a_checkpoint_folder_is_one_error(capsys):
    from hybridmim.cli import main

    assert main(["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--steps", "2", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == "error: --resume needs --checkpoint-dir: the checkpoint is kept there"
