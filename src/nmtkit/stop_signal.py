"""Ctrl-C and SIGTERM during training: finish the current step, save a checkpoint, exit cleanly.

A signal only sets a flag; the loop checks it between steps, where model, optimizer and step
counter agree. A second Ctrl-C interrupts at once. During the setup before the first step (tokenizer
training, data encoding: minutes on a large corpus) there is nothing to save, so a signal interrupts at
once (`at_once`).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self) -> None:
        self.requested = ""  # the signal's name once one arrived
        self.at_once = False  # True while there is no step to finish
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.at_once:
            log.warning("%s received before the first step: stopping now, with nothing trained", signal.Signals(signum).name)
            raise KeyboardInterrupt
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", self.requested)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
