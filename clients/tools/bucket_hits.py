"""The compiled decode step's bucket hit histogram, as the bench prints it: how many decode steps
each batch-size bucket served and how much of the computed rows was padding. The server's
drivers write their counts into `--compile-stats-dir` after every step (decode-buckets-PID.json,
shards/compiled_step.py); the bench reads them before and after each level."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BucketHits:
    """Decode steps per bucket and the sequences they held (summed over replicas)."""

    steps: Counter[int] = field(default_factory=Counter)
    rows: Counter[int] = field(default_factory=Counter)

    @classmethod
    def read(cls, folder: Path) -> BucketHits:
        steps, rows = Counter(), Counter()
        for path in sorted(folder.glob("decode-buckets-*.json")):
            counts = json.loads(path.read_text())
            steps.update({int(bucket): n for bucket, n in counts["hits"].items()})
            rows.update({int(bucket): n for bucket, n in counts["rows"].items()})
        return cls(steps, rows)

    def __sub__(self, before: BucketHits) -> BucketHits:
        return BucketHits(self.steps - before.steps, self.rows - before.rows)

    @property
    def padding(self) -> float:
        """Share of the rows the compiled steps computed that were padding."""
        computed = sum(bucket * n for bucket, n in self.steps.items())
        return 1 - sum(self.rows.values()) / computed if computed else 0.0

    def as_dict(self) -> dict:
        return {
            "buckets": {str(b): {"steps": self.steps[b], "sequences": self.rows[b]} for b in sorted(self.steps)},
            "padding": self.padding,
        }

    def lines(self) -> list[str]:
        total = sum(self.steps.values())
        if not total:
            return ["compiled decode buckets: no decode step ran compiled"]
        lines = ["compiled decode buckets: steps served (share), mean sequences, padding rows"]
        for bucket in sorted(self.steps):
            steps = self.steps[bucket]
            mean = self.rows[bucket] / steps
            lines.append(
                f"  bucket {bucket:>4}: {steps:>6} steps ({steps / total:6.1%}), {mean:6.1f} sequences, padding {1 - mean / bucket:6.1%}"
            )
        lines.append(f"  padding waste: {self.padding:.1%} of the rows the compiled steps computed")
        return lines
