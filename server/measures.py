"""Numbers derived from what the scheduler records, shared by spans, metrics and the log."""

from __future__ import annotations

from dataclasses import dataclass

from shardgate.server.request import Request
from shardgate.server.scheduler import SchedulerStatus, StepPlan

GENAI_OPERATION = "text_completion"
"""gen_ai.operation.name of a generation request with a prompt (GenAI semantic conventions)."""
GENAI_CHAT = "chat"
"""gen_ai.operation.name of a generation request with chat messages."""
GENAI_EMBEDDINGS = "embeddings"
"""gen_ai.operation.name of an Embed call."""
GENAI_PROVIDER = "shardgate"
"""gen_ai.provider.name of every span: the model is served here, not by a hosted provider."""


@dataclass(frozen=True)
class RequestTimes:
    """A request's latencies in seconds; None where the moment never came."""

    duration_s: float
    """Arrival at the engine until the request ended."""
    queue_s: float | None
    """Arrival until its first step."""
    ttft_s: float | None
    """Arrival until its first token."""
    tpot_s: float | None
    """Mean time per output token after the first (needs two tokens)."""
    prefill_s: float | None
    """First step until the first token."""
    decode_s: float | None
    """First token until the end."""

    @classmethod
    def of(cls, request: Request, now: float) -> RequestTimes:
        end = request.finished_at if request.finished_at is not None else now
        first_token, n = request.first_token, len(request.output_ids)
        return cls(
            duration_s=end - request.arrival,
            queue_s=None if request.first_scheduled is None else request.first_scheduled - request.arrival,
            ttft_s=None if first_token is None else first_token - request.arrival,
            tpot_s=(end - first_token) / (n - 1) if first_token is not None and n > 1 else None,
            prefill_s=None if first_token is None or request.first_scheduled is None else first_token - request.first_scheduled,
            decode_s=None if first_token is None else end - first_token,
        )


@dataclass(frozen=True)
class StepShape:
    """What one batch step computed."""

    phase: str
    """prefill (only prompt chunks), decode (only single next tokens) or mixed."""
    batch_size: int
    """Sequences in the step."""
    tokens: int
    """Tokens computed: prefill chunk tokens plus one per decode."""
    prefill_tokens: int
    decode_tokens: int

    @classmethod
    def of(cls, plan: StepPlan) -> StepShape:
        # A decode computes the one token sampled last; anything else (a prompt chunk, or a
        # preempted request's recomputation) is prefill work.
        decode_chunks = sum(1 for c in plan.chunks if c.num_tokens == 1 and c.start_pos >= len(c.request.prompt_ids))
        decode = decode_chunks * plan.num_steps
        tokens = plan.num_tokens
        if decode_chunks == len(plan.chunks):
            phase = "decode"
        elif decode == 0:
            phase = "prefill"
        else:
            phase = "mixed"
        return cls(phase, len(plan.chunks), tokens, tokens - decode, decode)


@dataclass(frozen=True)
class ReplicaStatus:
    state: SchedulerStatus
    """Its queue and KV cache."""
    forward_passes: int
    embed_forward_passes: int
    healthy: bool
    restarts: int
