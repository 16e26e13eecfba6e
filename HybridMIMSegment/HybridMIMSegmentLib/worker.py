"""Long work in a separate Python process: the ``hybridmim`` command line tool with ``--progress json``.

Why a process and not a thread: inside Slicer the main thread holds the GIL while it idles in the Qt event loop,
so a Python worker thread only advances while the main thread runs Python. A process also keeps torch and MONAI
out of Slicer's process, returns its memory when it ends, survives a crash and makes Cancel a kill.

The process writes one JSON record per line to a file in its private folder; ``poll`` (called by a GUI timer or a
waiting loop, on the main thread) reads the new lines. No threads, no pipes that could fill up. Pure Python: no
Slicer, Qt or torch import, so it is tested with plain Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hybridmim.errors import Cancelled, HybridMIMError
from hybridmim.progress import PARENT_ENVIRONMENT

#: Where the ``hybridmim`` package lives: the worker imports it from here, whatever the current directory.
ENGINE_PARENT = Path(__file__).resolve().parents[1]
CANCEL_GRACE_SECONDS = 5.0
LOG_TAIL_CHARACTERS = 2000

Record = dict[str, Any]


class WorkerCrashed(HybridMIMError):
    """The worker process ended without a result or a reported error (killed, out of memory, a bug)."""


def python_executable() -> str:
    """``PythonSlicer`` inside Slicer (Slicer's own interpreter, set up for its packages), else this interpreter."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        launcher = shutil.which("PythonSlicer")
        if launcher:
            return launcher
    return sys.executable


def worker_environment() -> dict[str, str]:
    """This process's environment with the engine importable (Slicer's module paths are not the worker's)."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(ENGINE_PARENT), *filter(None, [environment.get("PYTHONPATH")])])
    environment["PYTHONUNBUFFERED"] = "1"
    environment[PARENT_ENVIRONMENT] = str(os.getpid())  # the worker stops if this process dies
    return environment


class WorkerProcess:
    """One run of ``python -m hybridmim.cli ARGS --progress json`` in a private temporary folder.

    ``folder`` holds the inputs the caller writes before ``start`` and the outputs the worker writes; it is removed
    by ``cleanup`` (after the caller has read the results) and at once on cancel or failure.
    """

    def __init__(self, name: str = "run", cancel_discards_result: bool = True) -> None:
        """``cancel_discards_result``: a run that completed although Cancel was pressed counts as cancelled (a
        segmentation not yet in the scene). False where the result already exists for everyone (a fine-tune's
        model, written and made active): it is reported, not hidden."""
        self.cancel_discards_result = cancel_discards_result
        self.folder = Path(tempfile.mkdtemp(prefix=f"HybridMIMSegment-{name}-"))
        self.records: list[Record] = []
        self.result: Record | None = None
        self.error: BaseException | None = None
        self._process: subprocess.Popen | None = None
        self._offset = 0
        self._partial = b""
        self._cancel_deadline: float | None = None
        self._handled = False

    @property
    def stdout_path(self) -> Path:
        return self.folder / "worker.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.folder / "worker.log"

    def start(self, arguments: Sequence[str], python: str | None = None) -> WorkerProcess:
        command = [python or python_executable(), "-m", "hybridmim.cli", *arguments, "--progress", "json"]
        # its own process group: PythonSlicer is a launcher that starts the real interpreter as a child, and
        # Cancel must reach both. Windows: no console window either.
        options = {"start_new_session": True} if os.name == "posix" else \
            {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                             cwd=self.folder, env=worker_environment(), **options)
        return self

    def _signal(self, force: bool) -> None:
        """SIGTERM (the worker unwinds and writes nothing) or SIGKILL to the whole process group. Windows has no
        polite signal for a console process without a window: the process tree is ended at once (taskkill /T /F);
        a model being saved is still safe (it is renamed into place only when complete)."""
        if os.name == "posix":
            with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                os.killpg(self._process.pid, signal.SIGKILL if force else signal.SIGTERM)
        elif self._process.poll() is None:
            subprocess.run(["taskkill", "/PID", str(self._process.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW, check=False)

    def _group_alive(self) -> bool:
        """Whether any process of the worker's group is left: the launcher (PythonSlicer) may end before the
        interpreter it started."""
        if self._process.poll() is None:
            return True
        if os.name != "posix":
            return False
        try:
            os.killpg(self._process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    @property
    def running(self) -> bool:
        return self._process is not None and self._group_alive()

    @property
    def cancelling(self) -> bool:
        return self._cancel_deadline is not None

    @property
    def done(self) -> bool:
        """Ended and its outcome decided (``result`` or ``error`` set); call ``poll`` to advance."""
        return self._handled

    def poll(self) -> list[Record]:
        """The records written since the last call; once the process has ended, decides the outcome."""
        if self._process is None or self._handled:
            return []
        ended = not self._group_alive()
        if self._cancel_deadline is not None and not ended and time.monotonic() > self._cancel_deadline:
            self._signal(force=True)  # ignored the polite request
            self._process.wait()
            ended = True
        new = self._read_records()  # after the liveness check: an ended worker's lines are all there
        if ended:
            self._finish()
        return new

    def _read_records(self) -> list[Record]:
        try:
            with open(self.stdout_path, "rb") as stream:
                stream.seek(self._offset)
                data = stream.read()
        except OSError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a record (a library printing to stdout)
            if isinstance(record, dict) and "event" in record:
                records.append(record)
        self.records.extend(records)
        return records

    def _finish(self) -> None:
        self._handled = True
        code = self._process.returncode
        results = [r for r in self.records if r["event"] == "result"]
        errors = [r for r in self.records if r["event"] == "error"]
        completed = code == 0 and results
        if self._cancel_deadline is not None and not (completed and not self.cancel_discards_result):
            self.error = Cancelled("Cancelled by the user; nothing was written.")
        elif completed:
            self.result = results[-1]
        elif errors:
            self.error = HybridMIMError(errors[-1].get("message") or "The worker reported an error")
        elif any(r["event"] == "cancelled" for r in self.records):
            self.error = Cancelled("The worker was interrupted; nothing was written.")
        else:
            self.error = WorkerCrashed(f"The worker process stopped unexpectedly (exit code {code}). "
                                       f"End of its log:\n{self.log_tail()}")
        if self.error is not None:
            self.cleanup()

    def log_tail(self) -> str:
        try:
            text = self.stderr_path.read_bytes()[-LOG_TAIL_CHARACTERS:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return text.strip() or "(empty log)"

    def cancel(self) -> None:
        """Ask the worker to stop (SIGTERM: it writes nothing); ``poll`` kills it after a grace period."""
        if self._process is None or self._handled:
            return
        if self._cancel_deadline is None:
            self._cancel_deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            self._signal(force=False)

    def wait(self, timeout: float | None = None, on_records: Callable[[list[Record]], None] | None = None,
             interval: float = 0.1) -> bool:
        """Poll until done (True) or ``timeout`` seconds passed (False), handing new records to ``on_records``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._handled:
            records = self.poll()
            if records and on_records is not None:
                on_records(records)
            if self._handled:
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def cleanup(self) -> None:
        """Remove the private folder (inputs, outputs, logs). Whatever is left of the worker is killed first."""
        if self._process is not None and self.running:
            self._signal(force=True)
            self._process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class WorkerTask:
    """A worker run as the module sees it: ``fraction`` and ``message`` from its records, ``poll`` (GUI timer),
    ``wait`` (scripts), ``cancel``. Subclasses write their inputs and name the command in ``arguments`` and read
    their own records in ``take``. The private folder is removed when the run ends, unless ``keep_outputs`` (the
    caller then reads them and calls ``process.cleanup``)."""

    keep_outputs = False
    cancel_discards_result = True

    def __init__(self, name: str) -> None:
        self.fraction, self.message = 0.0, "Starting the worker"
        self.process = WorkerProcess(name, self.cancel_discards_result)
        try:
            self.process.start(self.arguments(self.process.folder))
        except BaseException:
            self.process.cleanup()
            raise

    def arguments(self, folder: Path) -> list[str]:
        """Write the inputs into ``folder``; the command line tool's arguments."""
        raise NotImplementedError

    def take(self, records: list[Record]) -> None:
        """Update the task from new records (progress, steps, status)."""

    @property
    def done(self) -> bool:
        return self.process.done

    @property
    def error(self) -> BaseException | None:
        return self.process.error

    def poll(self) -> bool:
        """Read the worker's news; True once it has ended."""
        self.take(self.process.poll())
        self._ended()
        return self.process.done

    def cancel(self) -> None:
        self.process.cancel()
        self.message = "Cancelling"

    def wait(self, timeout: float | None = None, on_records: Callable[[list[Record]], None] | None = None) -> bool:
        """Block until done (True) or ``timeout`` seconds passed (False)."""
        def handle(records: list[Record]) -> None:
            self.take(records)
            if on_records is not None:
                on_records(records)

        finished = self.process.wait(timeout, handle)
        self._ended()
        return finished

    def _ended(self) -> None:
        if self.process.done and not self.keep_outputs:
            self.process.cleanup()
