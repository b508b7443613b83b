"""Fault injection for tests of replica supervision: make one rank fail at one step, or at every
step that carries one particular request.

Set SHARDGATE_FAULT in the gateway's (or a shard's) environment, as comma-separated key=value
pairs:
- `replica=P,rank=R,step=K,kind=raise|hang|exit`: rank R of replica P raises in its forward,
  hangs, or exits abruptly when it runs its K-th step, in the replica's first start only (a
  restarted replica runs clean, so recovery can be tested).
- `prompt=MARKER,kind=...[,rank=R][,replica=P]`: the rank (default 0, the driver) fails at every
  step holding a chunk whose tokens contain MARKER's (as the model's tokenizer
  encodes MARKER alone: a marker standing as its own word, or any text with a byte-level
  tokenizer), on every start of every replica (or of replica P only): a "poison" request that
  kills whichever replica runs it.

The gateway tells each shard its replica and start number (SHARDGATE_REPLICA, "index:start").
Unset, nothing happens (one comparison per step)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

ENV_VAR = "SHARDGATE_FAULT"
REPLICA_ENV_VAR = "SHARDGATE_REPLICA"
KINDS = ("raise", "hang", "exit")
_FORMS = "replica=0,rank=1,step=3,kind=raise or prompt=MARKER,kind=exit"


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int = 0
    replica: int | None = None
    """None: every replica."""
    step: int | None = None
    """Fire at this step of the replica's first start (or, with prompt, None)."""
    prompt: str | None = None
    """Fire at every step holding a sequence whose tokens contain this text's."""

    @classmethod
    def parse(cls, spec: str) -> Fault:
        try:
            fields = dict(part.split("=", 1) for part in spec.split(","))
            fault = cls(
                kind=fields.pop("kind"),
                rank=int(fields.pop("rank", 0)),
                replica=int(fields["replica"]) if "replica" in fields else None,
                step=int(fields["step"]) if "step" in fields else None,
                prompt=fields.get("prompt") or None,
            )
            fields.pop("replica", None), fields.pop("step", None), fields.pop("prompt", None)
        except (KeyError, ValueError):
            raise ValueError(f"{ENV_VAR} must look like {_FORMS}, not {spec!r}") from None
        if fields:
            raise ValueError(f"{ENV_VAR} has unknown keys {', '.join(sorted(fields))} (it takes replica, rank, step, prompt, kind)")
        if fault.kind not in KINDS:
            raise ValueError(f"{ENV_VAR} kind must be one of {', '.join(KINDS)}")
        if (fault.step is None) == (fault.prompt is None):
            raise ValueError(f"{ENV_VAR} needs either step (with replica) or prompt: {_FORMS}")
        if fault.step is not None and fault.replica is None:
            raise ValueError(f"{ENV_VAR} with step needs replica: {_FORMS}")
        return fault


class FaultInjector:
    def __init__(self, fault: Fault | None, replica: int, start: int, rank: int) -> None:
        targeted = (
            fault is not None
            and fault.rank == rank
            and fault.replica in (None, replica)
            and (fault.prompt is not None or start == 0)  # a step fault: the first start only
        )
        self._fault = fault if targeted else None
        self._marker: tuple[int, ...] = ()
        self._steps = 0

    @classmethod
    def from_environment(cls, rank: int) -> FaultInjector:
        spec = os.environ.get(ENV_VAR)
        replica, _, start = os.environ.get(REPLICA_ENV_VAR, "-1:0").partition(":")
        return cls(Fault.parse(spec) if spec else None, int(replica), int(start or 0), rank)

    def bind_tokenizer(self, encode: Callable[[str], Sequence[int]]) -> None:
        """Gives a prompt fault the model's tokens of its marker (once the model is loaded)."""
        if self._fault is not None and self._fault.prompt is not None:
            self._marker = tuple(encode(self._fault.prompt))

    def on_step(self, chunks: Iterable[Sequence[int]] = ()) -> None:
        """Called at the start of every step this rank runs, with its chunks' token ids."""
        self._steps += 1
        if self._fault is None:
            return
        if self._fault.prompt is not None:
            if not self._marker or not any(self._holds_marker(tokens) for tokens in chunks):
                return
        elif self._steps != self._fault.step:
            return
        self._fire()

    def _holds_marker(self, tokens: Sequence[int]) -> bool:
        n = len(self._marker)
        return any(tuple(tokens[i : i + n]) == self._marker for i in range(len(tokens) - n + 1))

    def _fire(self) -> None:
        if self._fault.kind == "raise":
            raise InjectedFault(f"injected fault at step {self._steps}")
        if self._fault.kind == "exit":
            os._exit(3)
        while True:  # hang
            time.sleep(3600)
