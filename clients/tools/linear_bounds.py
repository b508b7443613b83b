"""`shardgate bench --profile`: how fast this machine runs the served model's own linears, the
measured bound a decode step is held against. A decode step's time is mostly its linears (the
profile's shares say so); here every linear weight of the model (the LM head included) is
multiplied alone, with nothing else in the step, at batch 1 and at the profiled batch sizes:
by eager `F.linear`, by inductor with freezing (weights prepacked for oneDNN), and, when this
process loaded the CPU decode kernels, by the linears the compiled step calls (the decode
linear for one or two rows, the packed linear up to 64: shards/cpu_kernels.py). Beside them: a
plain read of the same weights (the bandwidth bound of batch 1) and a large
square matmul in the same dtype (the machine's practical matmul peak, for the compute-bound
batches)."""

from __future__ import annotations

import time
from dataclasses import dataclass

PEAK_SIZE = 2048
"""Side of the square matmul that measures the matmul peak."""


@dataclass(frozen=True)
class LinearBounds:
    weight_bytes: int
    read_s: float
    """A sum over every linear weight: the least time any batch-1 step can take."""
    flops_per_row: float
    """2 × the linears' weights: FLOPs of one row (one decode) through every linear."""
    eager_s: dict[int, float]
    """Batch size → every linear by F.linear."""
    prepacked_s: dict[int, float]
    """Batch size → every linear, inductor-frozen (prepacked)."""
    peak_flops: float
    kernels_s: dict[int, float]
    """Batch size → every linear as the served step routes it with the CPU decode kernels
    loaded (empty when they are not)."""

    def lines(self) -> list[str]:
        gb = self.weight_bytes / 1e9
        out = [
            f"linears alone ({gb * 1e3:.1f} MB of weights): read {self.read_s * 1e3:.2f} ms ({gb / self.read_s:.1f} GB/s); "
            f"matmul peak {self.peak_flops / 1e9:.0f} GFLOP/s ({PEAK_SIZE}² matrices)"
        ]
        for batch in sorted(self.eager_s):
            flops = self.flops_per_row * batch
            eager, packed = self.eager_s[batch], self.prepacked_s[batch]
            line = (
                f"  batch {batch}: F.linear {eager * 1e3:.2f} ms ({gb / eager:.1f} GB/s, {flops / eager / 1e9:.0f} GFLOP/s); "
                f"prepacked {packed * 1e3:.2f} ms ({gb / packed:.1f} GB/s, {flops / packed / 1e9:.0f} GFLOP/s)"
            )
            if batch in self.kernels_s:
                ours = self.kernels_s[batch]
                line += f"; decode kernels {ours * 1e3:.2f} ms ({gb / ours:.1f} GB/s, {flops / ours / 1e9:.0f} GFLOP/s)"
            out.append(line)
        return out

    def as_dict(self) -> dict:
        return {
            "weight_bytes": self.weight_bytes,
            "read_ms": self.read_s * 1e3,
            "peak_gflops": self.peak_flops / 1e9,
            "batches": {
                str(batch): {
                    "eager_ms": self.eager_s[batch] * 1e3,
                    "prepacked_ms": self.prepacked_s[batch] * 1e3,
                    **({"decode_kernels_ms": self.kernels_s[batch] * 1e3} if batch in self.kernels_s else {}),
                }
                for batch in self.eager_s
            },
        }


def measure(model, batches: list[int], repeats: int = 12) -> LinearBounds | None:
    """Times the model's linear weights (None when they are not plain float matrices, as with
    --quantize int8)."""
    import torch
    import torch._inductor.config
    import torch.nn.functional as F

    from shardgate.shards import cpu_kernels
    from shardgate.shards.int8_linear import linear

    weights = _linear_weights(model)
    if not weights or any(not isinstance(weight, torch.Tensor) or not weight.is_floating_point() for weight in weights):
        return None
    weights = [weight.detach() for weight in weights]
    dtype, device = weights[0].dtype, weights[0].device
    inputs = {batch: {w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype, device=device) for w in weights} for batch in batches}

    class Linears(torch.nn.Module):
        def forward(self, xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
            return [F.linear(xs[w.shape[1]], w) for w in self.weights]

    linears = Linears().eval()
    linears.weights = torch.nn.ParameterList(torch.nn.Parameter(w, requires_grad=False) for w in weights)
    torch._inductor.config.freezing = True
    prepacked = torch.compile(linears)
    packed = [cpu_kernels.pack_weight(w) for w in weights] if cpu_kernels.loaded() else None
    eager_s, prepacked_s, kernels_s = {}, {}, {}
    with torch.no_grad():
        read_s = _quartile(lambda: [w.sum() for w in weights], repeats)
        for batch in batches:
            xs = inputs[batch]
            eager_s[batch] = _quartile(lambda xs=xs: linears(xs), repeats)
            prepacked(xs)  # compiles this batch size
            prepacked_s[batch] = _quartile(lambda xs=xs: prepacked(xs), repeats)
            if packed is not None:
                kernels_s[batch] = _quartile(lambda xs=xs: [linear(xs[w.shape[1]], w, None, p) for w, p in zip(weights, packed)], repeats)
        square = torch.randn(PEAK_SIZE, PEAK_SIZE, dtype=dtype, device=device)
        peak = 2 * PEAK_SIZE**3 / _quartile(lambda: square @ square, max(3, repeats // 2))
    return LinearBounds(
        weight_bytes=sum(w.numel() * w.element_size() for w in weights),
        read_s=read_s,
        flops_per_row=2.0 * sum(w.numel() for w in weights),
        eager_s=eager_s,
        prepacked_s=prepacked_s,
        peak_flops=peak,
        kernels_s=kernels_s,
    )


def _linear_weights(model) -> list:
    """Every matrix a decode step multiplies by: 2-D parameters but the input embedding (a
    lookup), and the LM head even when it shares the embedding (int8 weights are not tensors)."""
    weights = [param for name, param in model.named_parameters() if param.dim() == 2 and "embed_tokens" not in name]
    head = getattr(model, "lm_head", None)
    if head is not None and all(head.weight is not weight for weight in weights):
        weights.append(head.weight)
    return weights


def _quartile(run, repeats: int) -> float:
    """The lower quartile of repeated timings (a shared machine's noise only adds time)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 4]
