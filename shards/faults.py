"""Fault injection for tests of replica supervision: make one rank fail at one step.

Set SHARDGATE_FAULT="rank=R,step=K,kind=raise|hang|exit" in a shard's environment; rank R then
raises in its forward, hangs, or exits abruptly when it runs its K-th step. Unset, nothing
happens (one integer comparison per step)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV_VAR = "SHARDGATE_FAULT"
KINDS = ("raise", "hang", "exit")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    kind: str

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        try:
            fields = dict(part.split("=", 1) for part in spec.split(","))
            fault = cls(int(fields["rank"]), int(fields["step"]), fields["kind"])
        except (KeyError, ValueError):
            raise ValueError(f"{ENV_VAR} must look like rank=1,step=3,kind=raise, not {spec!r}") from None
        if fault.kind not in KINDS:
            raise ValueError(f"{ENV_VAR} kind must be one of {', '.join(KINDS)}")
        return fault


class FaultInjector:
    def __init__(self, rank: int, fault: Fault | None) -> None:
        self._fault = fault if fault is not None and fault.rank == rank else None
        self._steps = 0

    @classmethod
    def from_environment(cls, rank: int) -> "FaultInjector":
        spec = os.environ.get(ENV_VAR)
        return cls(rank, Fault.parse(spec) if spec else None)

    def on_step(self) -> None:
        """Called at the start of every step this rank runs."""
        self._steps += 1
        if self._fault is None or self._steps != self._fault.step:
            return
        if self._fault.kind == "raise":
            raise InjectedFault(f"injected fault at step {self._steps}")
        if self._fault.kind == "exit":
            os._exit(3)
        while True:  # hang
            time.sleep(3600)
