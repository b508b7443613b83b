"""The state of one generation request, as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings of a request."""

    max_new_tokens: int
    temperature: float
    """0 means greedy."""
    top_p: float
    top_k: int
    seed: int
    ignore_eos: bool
    logprobs: bool


@dataclass(eq=False)
class Request:
    """A request moves WAITING → RUNNING (→ WAITING again if preempted) → FINISHED.

    There is no separate prefill phase: each step computes part of the gap between
    `num_computed_tokens` and `num_tokens`, so a prompt may be prefilled in several chunks and a
    preempted request is simply recomputed from zero.
    """

    seq_id: int
    """Gateway-wide id of the sequence (never reused while the gateway runs)."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    """Higher runs first (see server/priority.py)."""
    deadline: float | None = None
    """time.monotonic() by which the request must end, or None."""
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache, or computed by a step already sent to the replica."""
    num_in_flight_tokens: int = 0
    """Tokens sampled by steps sent to the replica whose answers are not applied yet (async
    scheduling): their positions are planned, their ids not known; output_ids holds the applied ones."""
    block_ids: list[int] = field(default_factory=list)
    """KV blocks held, in position order."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Chained content hashes of the first full blocks of prompt + output (server/block_manager.py),
    computed as the scheduler needs them; the tokens never change, so neither do they."""
    cache_salt: bytes = b""
    """Parent of its first block hash: only requests with the same salt share cached blocks (the
    engine API derives it from the caller's tenant and the request's cache_salt)."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache when the request first ran."""
    status: Status = Status.WAITING
    held: bool = False
    """Its caller's stream has too much output not yet written: it gets no steps until it drains
    (the engine sets this before each schedule)."""
    known_to_replica: bool = False
    """The replica holds this sequence's block table and sampling settings."""
    num_preemptions: int = 0
    num_resumes: int = 0
    """Times it moved, after it had started, to another replica (or its own, restarted) whose
    predecessor failed or was preempted, and continued there (usage.resumes)."""
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    """time.monotonic() when its latest token reached the gateway."""
    token_gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive tokens reaching the gateway (the inter-token latency metric)."""
    finished_at: float | None = None
    """time.monotonic() when the request ended (finished, cancelled or failed)."""
    finish_reason: FinishReason | None = None
    device_seconds: float = 0.0
    """Its share of the device time of the steps it was in (server/cost.py)."""
    span_context: SpanContext | None = None
    """The request's span, when traced: parent of its stage spans, target of the step spans' links."""
    protocol: str = "grpc"
    """The frontend the request came in by (grpc, openai, kserve): a metrics label."""
    operation: str = "text_completion"
    """Its gen_ai.operation.name: text_completion, or chat for chat messages (a metrics label)."""

    def moved(self, seq_id: int) -> Request:
        """The same generation as a new sequence of another replica: its prompt, the tokens it
        generated (kept at their positions: the replica recomputes prompt + output from position
        0, as after a preemption, and samples the next token with output_index = len(output_ids)),
        its settings, deadline and timings, with no KV blocks and nothing computed. A new object,
        so that a step of the old replica still in flight can never touch it."""
        return replace(
            self,
            seq_id=seq_id,
            output_ids=list(self.output_ids),
            output_logprobs=list(self.output_logprobs),
            num_computed_tokens=0,
            block_ids=[],
            block_hashes=list(self.block_hashes),
            status=Status.WAITING,
            held=False,
            known_to_replica=False,
            token_gaps=list(self.token_gaps),
            finished_at=None,
            finish_reason=None,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of prompt + output."""
        n_prompt = len(self.prompt_ids)
        if stop <= n_prompt:
            return self.prompt_ids[start:stop]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt : stop - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[: stop - n_prompt]
