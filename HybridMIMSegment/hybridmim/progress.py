"""Progress reporting and cooperative cancellation shared by the Slicer module, the CLI and training."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import Cancelled

#: Environment variable naming the process a worker serves (the Slicer application): the worker stops when it is
#: gone, so a crashed or killed Slicer leaves no fine-tune running on to write a model.
PARENT_ENVIRONMENT = "HYBRIDMIM_PARENT_PID"

#: Called with (fraction done in [0, 1], short message).
ProgressCallback = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """Default callback: report nothing."""


class CancelToken:
    """A flag another thread sets to ask long work to stop at its next check point."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("Cancelled by the user; nothing was written.")
