"""The user models folder under concurrent use: two fine-tunes at once each get their own version, no
active.json entry is lost, staging left by killed runs is cleaned, a damaged active.json is a warning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import BUNDLED_MODEL, REPO, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.model_card import CARD_FILE
from hybridmim.model_store import (
    ACTIVE_FILE,
    active_versions,
    model_versions,
    resolve_model,
    set_active_version,
    user_models_dir,
)
from hybridmim.staging import STALE_STAGING_SECONDS


@pytest.mark.slow
def test_two_fine_tunes_at_once_get_their_own_versions():
    env = {**os.environ, "PYTHONPATH": str(REPO / "HybridMIMSegment"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hybridmim.cli", "finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}",
               "--steps", "2", "--device", "cpu", "--quiet"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    versions = [v.card.version for v in model_versions("hippocampus-cnn")]
    assert versions == ["2.0.0", "2.0.0-ft.1", "2.0.0-ft.2"]
    assert active_versions()["hippocampus-cnn"] in versions[1:]


def make_user_version(model_id: str) -> None:
    folder = shutil.copytree(BUNDLED_MODEL, user_models_dir() / f"{model_id}-1.0.0")
    card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    (folder / CARD_FILE).write_text(json.dumps({**card, "id": model_id, "version": "1.0.0"}), encoding="utf-8")


def test_concurrent_activations_lose_no_entry():
    ids = [f"model-{n}" for n in range(6)]
    for model_id in ids:
        make_user_version(model_id)
    errors = []

    def activate(model_id: str) -> None:
        try:
            for _ in range(10):
                set_active_version(model_id, "1.0.0")
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=activate, args=(model_id,)) for model_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and active_versions() == {model_id: "1.0.0" for model_id in ids}


def test_stale_staging_is_cleaned_and_fresh_staging_kept():
    make_user_version("model-a")
    root = user_models_dir()
    stale, fresh = root / ".model-b-1.0.0.k3j2", root / ".model-c-1.0.0.x9q1"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(stale, (old, old))
    set_active_version("model-a", "1.0.0")
    assert not stale.exists() and fresh.exists()


def test_a_damaged_active_file_warns_and_falls_back_to_the_newest(caplog):
    make_user_version("model-a")
    (user_models_dir() / ACTIVE_FILE).write_text("[" * 100000, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert active_versions() == {}
    assert "hybridmim revert" in caplog.text
    assert resolve_model("model-a").name == "model-a-1.0.0"
    set_active_version("model-a", "1.0.0")  # the way back writes a good file
    assert active_versions() == {"model-a": "1.0.0"}
