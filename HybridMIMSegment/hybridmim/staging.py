"""Staging areas: results are written under a hidden name next to their target and renamed into place, so a reader
sees a complete result or none. A process killed with SIGKILL cannot remove its staging area; the next writer to
the same folder removes the ones old enough to belong to a dead run."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

STALE_STAGING_SECONDS = 600  # longer than any write takes: an entry this old belongs to a run that was killed


def remove_stale_staging(folder: Path, prefix: str, keep: Collection[str] = ()) -> None:
    """Remove entries of ``folder`` named ``prefix...`` (except ``keep``) untouched for STALE_STAGING_SECONDS."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name not in keep:
            try:
                if time.time() - entry.lstat().st_mtime > STALE_STAGING_SECONDS:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except OSError:
                continue


def probe_new_file(folder: Path) -> None:
    """Create and delete a hidden file in ``folder``; OSError when it cannot take new files (permissions,
    read-only mounts, pseudo file systems such as /sys, a full disk): only a real file tells."""
    with tempfile.TemporaryFile(prefix=".hybridmim-probe-", dir=folder):
        pass
