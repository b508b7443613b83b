"""How long the gateway waits for a replica's call before it counts the replica as failed.

One fixed bound must cover the slowest legitimate step (a full prefill on a cold device), so a
hung or stopped rank would go unnoticed that long. Instead each call's deadline follows what
calls of its shape took: a moving average of the seconds per forward of its class (decode-only
step, step with prefill chunks, or embedding batch; and tokens per forward rounded up to a power
of two), times `multiple`, per forward the call runs, never under `floor_s` and never over
`ceiling_s` (--step-timeout) per forward, which is also the deadline of a class nothing is
known of yet.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODE, PREFILL, EMBED = "decode", "prefill", "embed"


@dataclass(frozen=True)
class CallShape:
    kind: str
    """DECODE (a step of single-token decodes only), PREFILL (a step with a longer chunk) or EMBED."""
    tokens: int
    """Tokens computed per forward."""
    forwards: int = 1
    """Forwards the call runs back to back (a decode run's steps)."""

    @property
    def bucket(self) -> int:
        """The tokens rounded up to a power of two: the class's size."""
        return 1 << max(self.tokens - 1, 0).bit_length()


class StepDeadlines:
    def __init__(self, ceiling_s: float, multiple: float, floor_s: float, smoothing: float = 0.2) -> None:
        self.ceiling_s = ceiling_s
        self.multiple = multiple
        self.floor_s = min(floor_s, ceiling_s)
        self._smoothing = smoothing
        self._averages: dict[tuple[str, int], float] = {}
        """(kind, bucket) -> exponential moving average of the seconds per forward."""

    def timeout(self, shape: CallShape) -> float:
        """Seconds to wait for a call of this shape."""
        ceiling = self.ceiling_s * shape.forwards
        expected = self.expected(shape)
        if expected is None:
            return ceiling
        return min(ceiling, max(self.floor_s, self.multiple * expected * shape.forwards))

    def record(self, shape: CallShape, seconds: float) -> None:
        """Counts a call of this shape that answered in `seconds`."""
        per_forward = seconds / max(shape.forwards, 1)
        key = (shape.kind, shape.bucket)
        old = self._averages.get(key)
        self._averages[key] = per_forward if old is None else old + self._smoothing * (per_forward - old)

    def expected(self, shape: CallShape) -> float | None:
        """Seconds per forward a call of this shape should take: its class's average; for a class
        not seen yet, the nearest class's of the same kind, or of any kind when the kind is new
        (the first decode-only step after many mixed ones); None when nothing is known."""
        same_kind = {bucket: seconds for (kind, bucket), seconds in self._averages.items() if kind == shape.kind}
        if same_kind:
            return _nearest(same_kind, shape.bucket)
        any_kind: dict[int, float] = {}
        for (_, bucket), seconds in self._averages.items():
            any_kind[bucket] = max(seconds, any_kind.get(bucket, 0.0))
        return _nearest(any_kind, shape.bucket) if any_kind else None


def _nearest(known: dict[int, float], bucket: int) -> float:
    """The seconds of `bucket` from those known: its own; else the nearest larger bucket's (more
    tokens never make a forward faster); else the nearest smaller one's scaled by the token ratio
    (forwards grow less than linearly with tokens, so this errs long)."""
    if bucket in known:
        return known[bucket]
    larger = [b for b in known if b > bucket]
    if larger:
        return known[min(larger)]
    nearest = max(known)
    return known[nearest] * bucket / nearest
