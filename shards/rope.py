"""Rotary position embeddings (RoPE) with the scaling kinds Llama-family checkpoints use.

The frequencies follow transformers' ``ROPE_INIT_FUNCTIONS`` exactly, so a model
served here rotates queries and keys the way it was trained.

``dynamic`` (dynamic NTK) only changes the frequencies once a sequence grows past
``max_position_embeddings``; below that it is plain RoPE. Positions here never
go past ``max_position_embeddings`` (the cos/sin cache ends there and the runner
rejects longer sequences), so dynamic is served, faithfully, as plain RoPE.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shardgate.shards.model_config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) float32, attention_scaling applied to cos and sin)."""
    dim = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    scaling = config.rope_scaling
    if scaling is None or scaling["rope_type"] == "dynamic":
        return inv_freq, 1.0
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"], 1.0
    if scaling["rope_type"] == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0
    if scaling["rope_type"] == "yarn":
        return _yarn_frequencies(inv_freq, dim, base, config.max_position_embeddings, scaling)
    raise ValueError(f"unsupported rope_type {scaling['rope_type']!r}")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: slow rotations divided by factor, fast ones kept, a smooth blend between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(inv_freq: torch.Tensor, dim: int, base: float, max_positions: int, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate slow dimensions, extrapolate fast ones, ramp between; scale attention by mscale."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 keeps the trained frequency, 0 interpolates it
    interpolated = 1.0 / (factor * (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, for x (T, n_heads, head_dim) and cos, sin (T, head_dim)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class RotaryEmbedding(nn.Module):
    """cos(p·θ), sin(p·θ) for every position p < max_position_embeddings, looked up per token.

    The tables are precomputed in float32 (half width: the two halves of a
    head repeat the same angles) and cast to the activation dtype on lookup,
    which is what transformers does, so bf16 rotations match it bit for bit.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, attention_scaling = rope_frequencies(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (max_positions, head_dim/2)
        self.register_buffer("cos_cache", angles.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin_cache", angles.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, head_dim) in dtype, for positions (T,)."""
        cos = self.cos_cache[positions]  # (T, head_dim/2)
        sin = self.sin_cache[positions]
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)
