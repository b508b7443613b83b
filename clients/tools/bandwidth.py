"""How close a decode step comes to the memory-bandwidth limit.

At batch 1 a decode step reads every weight once (the input embedding excepted: its rows are
gathered) and does little arithmetic per byte, so no implementation can beat weight bytes ÷
memory bandwidth. The bench measures the bandwidth on the server's device type (a full read of
a large buffer with this process's threads, best of several) and compares a step's time with
that bound."""

from __future__ import annotations

import time
from dataclasses import dataclass

READ_BYTES = 1 << 30
"""Buffer read to measure bandwidth: well beyond any cache."""


def read_bandwidth(device: str, nbytes: int = READ_BYTES, repeats: int = 5) -> float:
    """Bytes per second of a full read (a sum) of an nbytes float32 tensor on the device type.

    The buffer holds random numbers, not a constant: a virtual machine's host may merge pages of
    equal content (KSM), and reads of a few shared pages run from cache. The best of the reads is
    the bound, the strict choice; on a shared host it can be an outlier. Here two bench runs
    printed 57.0 and 51.3 GB/s while standalone reads of the same buffer that hour gave 30–34
    (and 35 with huge pages), and the decode step was no faster."""
    import torch

    device = "cuda" if device.startswith("cuda") else "cpu"
    buffer = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first read warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        buffer.sum().item()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


@dataclass(frozen=True)
class HardwareReport:
    """The decode step against the bandwidth bound, and the KV cache against its theory."""

    weight_bytes_per_step: int
    bandwidth_bytes_per_s: float
    step_s: float | None
    """Measured time per output token at concurrency 1 (None without that level)."""
    kv_bytes_per_token: int
    kv_theory_bytes_per_token: int
    """2 × layers × kv heads × head dim × dtype bytes."""

    @property
    def bound_s(self) -> float:
        return self.weight_bytes_per_step / self.bandwidth_bytes_per_s

    def as_dict(self) -> dict:
        return {
            "weight_bytes_per_step": self.weight_bytes_per_step,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "bandwidth_bound_ms": self.bound_s * 1e3,
            "decode_step_ms": None if self.step_s is None else self.step_s * 1e3,
            "step_over_bound": None if self.step_s is None else self.step_s / self.bound_s,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_theory_bytes_per_token": self.kv_theory_bytes_per_token,
            "kv_over_theory": self.kv_bytes_per_token / self.kv_theory_bytes_per_token,
        }

    def lines(self) -> list[str]:
        step = (
            "no concurrency-1 level, so no batch-1 step time to compare"
            if self.step_s is None
            else f"batch-1 decode step (TPOT p50 at concurrency 1) {self.step_s * 1e3:.1f} ms = {self.step_s / self.bound_s:.2f}× the bound"
        )
        return [
            f"bandwidth bound: {self.weight_bytes_per_step / 1e6:.1f} MB of weights per decode step ÷ "
            f"{self.bandwidth_bytes_per_s / 1e9:.1f} GB/s measured read bandwidth = {self.bound_s * 1e3:.1f} ms; {step}",
            f"KV cache: {self.kv_bytes_per_token} bytes per token allocated; theory 2 × layers × kv heads × head dim × dtype bytes = "
            f"{self.kv_theory_bytes_per_token} ({self.kv_bytes_per_token / self.kv_theory_bytes_per_token:.3f}×)",
        ]
