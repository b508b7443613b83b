"""Fault injection for tests of replica supervision: make one rank fail at one step.

Set SHARDGATE_FAULT="replica=P,rank=R,step=K,kind=raise|hang|exit" in the gateway's (or a
shard's) environment: rank R of replica P then raises in its forward, hangs, or exits abruptly
when it runs its K-th step, in the replica's first start only (a restarted replica runs clean,
so recovery can be tested). The gateway tells each shard its replica and start number
(SHARDGATE_REPLICA, "index:start"). Unset, nothing happens (one integer comparison per step)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV_VAR = "SHARDGATE_FAULT"
REPLICA_ENV_VAR = "SHARDGATE_REPLICA"
KINDS = ("raise", "hang", "exit")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    replica: int
    rank: int
    step: int
    kind: str

    @classmethod
    def parse(cls, spec: str) -> Fault:
        try:
            fields = dict(part.split("=", 1) for part in spec.split(","))
            fault = cls(int(fields["replica"]), int(fields["rank"]), int(fields["step"]), fields["kind"])
        except (KeyError, ValueError):
            raise ValueError(f"{ENV_VAR} must look like replica=0,rank=1,step=3,kind=raise, not {spec!r}") from None
        if fault.kind not in KINDS:
            raise ValueError(f"{ENV_VAR} kind must be one of {', '.join(KINDS)}")
        return fault


class FaultInjector:
    def __init__(self, fault: Fault | None, replica: int, start: int, rank: int) -> None:
        targeted = fault is not None and (fault.replica, fault.rank) == (replica, rank) and start == 0
        self._fault = fault if targeted else None
        self._steps = 0

    @classmethod
    def from_environment(cls, rank: int) -> FaultInjector:
        spec = os.environ.get(ENV_VAR)
        replica, _, start = os.environ.get(REPLICA_ENV_VAR, "-1:0").partition(":")
        return cls(Fault.parse(spec) if spec else None, int(replica), int(start or 0), rank)

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
