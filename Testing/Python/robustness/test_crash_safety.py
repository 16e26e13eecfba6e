"""Processes killed at the worst moments (mid-training, weights half written, just before the atomic rename)
never leave a model folder that lists, loads or resolves, and the user models folder keeps working."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.finetune import fine_tune
from hybridmim.model_store import active_versions, list_models, model_versions, resolve_model, user_models_dir
from hybridmim.settings import settings_from

# Runs ``hybridmim finetune`` after arming one crash point (an environment variable picks it).
CRASHING_FINETUNE = """
import os, signal, sys
point = os.environ["CRASH_AT"]
kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "rename":
    import hybridmim.model_store as store
    real_replace = os.replace
    store.os = type("os_crash", (), {**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")},
                                      "replace": staticmethod(kill)})
elif point == "weights":
    import safetensors.torch as st
    real_save = st.save_file
    def half_then_die(tensors, filename, *a, **k):
        real_save(tensors, filename, *a, **k)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        kill()
    st.save_file = half_then_die
from hybridmim.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_crashing(point: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "CRASH_AT": point, "PYTHONPATH": str(REPO / "HybridMIMSegment")}
    return subprocess.Popen([sys.executable, "-c", CRASHING_FINETUNE, "finetune", "--labeled",
                             f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}", "--device", "cpu", "--quiet", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")


def assert_user_folder_sane() -> None:
    assert [v.card.version for v in model_versions("hippocampus-cnn")] == ["2.0.0"]
    assert all(m.bundled for m in list_models())
    assert resolve_model("hippocampus-cnn").name == "hippocampus-cnn"
    assert active_versions() == {}


@pytest.mark.parametrize("point", ["rename", "weights"])
def test_killed_while_saving_leaves_no_model(point):
    process = run_crashing(point, "--steps", "2")
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert_user_folder_sane()
    assert all(p.name.startswith(".") for p in user_models_dir().iterdir())  # at most a hidden staging area
    folder = fine_tune("hippocampus-cnn", [(SAMPLE_IMAGE, SAMPLE_LABEL)], settings=settings_from("supervised",
                       steps=2), device="cpu")
    assert folder.name == "hippocampus-cnn-2.0.0-ft.1" and resolve_model("hippocampus-cnn") == folder


@pytest.mark.slow
def test_killed_mid_training_writes_nothing():
    process = run_crashing("none", "--minutes", "1")
    deadline = time.monotonic() + 120
    while "Fine-tuning" not in process.stdout.readline():  # training has started
        assert process.poll() is None and time.monotonic() < deadline
    time.sleep(2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not user_models_dir().exists() or list(user_models_dir().iterdir()) == []
    assert_user_folder_sane()
