"""Stop signals: SIGTERM/SIGINT/SIGUSR1 set a flag that all ranks agree on at step boundaries.

No rank ever exits alone: the flag is all-reduced (max) at each optimizer step, so every rank
stops after the same step and writes (rank 0) the same checkpoint before leaving.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from sslctl import STOP_SIGNALS, dist, log


class StopFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.raised: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.raised is None:
            log.warn(
                f"received {signal.Signals(signum).name}: checkpointing at the next step boundary"
            )
        self.raised = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self) -> bool:
        """True on every rank if any rank received a stop signal (one tiny all-reduce)."""
        return dist.any_rank(self.raised is not None)
