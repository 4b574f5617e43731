"""What the driver watches besides the steps' results: how long a step may take before it is a
straggler's (``StepClock``), and the signals that ask the run to stop (``StopOnSignal``)."""

from __future__ import annotations

import signal
import threading
import time
from collections import deque


class StepClock:
    """How long the driver waits for the next step's result before calling the step a straggler's:
    ``factor`` x the mean of recent step times, at least ``MIN_S``; ``cap_s`` while there are too
    few steps to measure (start-up, compilation, after a recovery)."""

    MIN_S, WARMUP = 5.0, 5

    def __init__(self, cap_s: float, factor: float):
        self.cap_s, self.factor = cap_s, factor
        self.restart()

    def restart(self) -> None:
        self.last, self.recent = time.time(), deque(maxlen=50)

    def tick(self, steps: int = 1) -> None:
        """A result of ``steps`` steps (one call's) came."""
        now = time.time()
        self.recent.append((now - self.last) / steps)
        self.last = now

    def timeout(self, patient: bool = False, steps: int = 1) -> float:
        """Seconds left for the next result, of ``steps`` steps; ``patient`` (a call that writes a
        checkpoint): cap_s."""
        if patient or not self.factor or len(self.recent) < self.WARMUP:
            return self.cap_s
        allowed = min(self.cap_s, max(self.MIN_S, self.factor * steps * sum(self.recent) / len(self.recent)))
        return max(0.1, self.last + allowed - time.time())


class StopOnSignal:
    """The first SIGINT or SIGTERM asks the loop to stop at the next logging step (it then writes a
    checkpoint); a second SIGINT interrupts at once. Only the main thread can own signals."""

    def __init__(self):
        self.signum, self.previous, self.announced = 0, {}, False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> int:
        """The signal that asked to stop, or 0; announced here, once, not in the handler (a print
        there could interrupt another print to the same stream)."""
        if self.signum and not self.announced:
            self.announced = True
            name = signal.Signals(self.signum).name
            print(f"{name}: stopping at the next logging step, then writing a checkpoint", flush=True)
        return self.signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
