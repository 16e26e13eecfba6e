"""Long work off the GUI thread: a worker thread with progress, cooperative cancel and a result or an error.

Qt-free on purpose: the module widget polls ``progress`` / ``done`` with a timer and hands the result to MRML on
the main thread (MRML and Qt objects are never touched from the worker).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from hybridmim.progress import CancelToken, ProgressCallback

Work = Callable[[ProgressCallback, CancelToken], Any]


class BackgroundTask:
    def __init__(self, work: Work, name: str = "HybridMIMSegment worker") -> None:
        self.cancel_token = CancelToken()
        self.fraction = 0.0
        self.message = "waiting"
        self.result: Any = None
        self.error: BaseException | None = None
        self._work = work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> BackgroundTask:
        self._thread.start()
        return self

    def run(self, progress: ProgressCallback | None = None) -> Any:
        """Do the work in the calling thread instead (scripts and tests that wait): returns the result or raises.
        ``progress`` receives what the work reports, in that thread."""
        def report(fraction: float, message: str) -> None:
            self._report(fraction, message)
            if progress is not None:
                progress(fraction, message)

        self.result = self._work(report, self.cancel_token)
        return self.result

    def _report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message

    def _run(self) -> None:
        try:
            self.result = self._work(self._report, self.cancel_token)
        except BaseException as error:  # handed to the main thread, which reports it
            self.error = error

    @property
    def done(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def cancel(self) -> None:
        self.cancel_token.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (True) or ``timeout`` seconds passed (False)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
