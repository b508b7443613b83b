"""Where one rank's time goes during a step: its collectives and pipeline transfers.

A step is timed only when the gateway asks for timings or traces it; otherwise no timer exists
and the collectives do nothing extra. On CPU (gloo) a collective returns when it is done, so a
perf_counter pair around it is its time. On CUDA (NCCL) a collective is only queued on the
stream when it returns, so its time is read from CUDA events recorded around it, once, at the
end of the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

KINDS = ("all_reduce", "all_gather", "pp_send", "pp_recv")


class CommTimer:
    """Seconds and counts of this rank's communication in one step, by kind (KINDS)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.counts = dict.fromkeys(KINDS, 0)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> float | torch.cuda.Event:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, kind: str, started: float | torch.cuda.Event) -> None:
        self.counts[kind] += 1
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((kind, started, end))
        else:
            self.seconds[kind] += time.perf_counter() - started

    @contextlib.contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        started = self.start()
        yield
        self.stop(kind, started)

    def finish(self) -> None:
        """Waits for the device's queued work and adds up the CUDA-timed intervals (on CPU there
        is nothing to wait for)."""
        if self._cuda:
            torch.cuda.synchronize()
            for kind, start, end in self._events:
                self.seconds[kind] += start.elapsed_time(end) / 1000.0
            self._events.clear()
