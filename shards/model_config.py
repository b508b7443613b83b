"""The architecture of a served model, read from a Hugging Face ``config.json`` or a GGUF file's metadata.

Kept free of torch so that anything (the gateway included) can read a config
without pulling in the model runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# GGUF ``general.architecture`` values read (a Mistral GGUF says llama).
GGUF_ARCHITECTURES = ("llama", "qwen2")
_REQUIRED = object()

# RoPE kinds shards.rope implements; "default" means plain rotary embedding.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# Keys each scaled rope_type cannot do without (checkpoints omit the optional ones).
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
}


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama-family transformer (Llama, Mistral, Qwen2).

    ``rope_scaling`` is None for plain RoPE, otherwise the scaling parameters
    with their ``rope_type`` (``rope_theta`` lives in its own field).
    ``sliding_window`` is None for full causal attention, otherwise each query
    sees only the last ``sliding_window`` positions, itself included (Mistral v0.1).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    model_type: str
    architecture: str
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if not self.eos_token_ids:
            raise ValueError("at least one eos token id is required")
        special = ([] if self.bos_token_id is None else [self.bos_token_id]) + list(self.eos_token_ids)
        for token_id in special:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"special token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @classmethod
    def from_hf(cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        """Read a ``config.json`` (and optional ``generation_config.json``) dict.

        Accepts both the transformers-4 layout (top-level ``rope_theta`` plus a
        ``rope_scaling`` dict keyed by ``type`` or ``rope_type``) and the
        transformers-5 layout (a ``rope_parameters`` dict holding ``rope_theta``
        and ``rope_type``).
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        missing = [
            key
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
            )
            if config.get(key) is None
        ]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")

        architectures = config.get("architectures") or [_DEFAULT_ARCHITECTURE[model_type]]
        architecture = architectures[0]
        if not architecture.endswith("ForCausalLM"):
            raise ValueError(f"architecture {architecture!r} is not a causal language model")
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (only silu)")
        if config.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if model_type != "qwen2" and config.get("attention_bias"):
            # Llama's attention_bias also puts a bias on o_proj, which no supported checkpoint has.
            raise ValueError(f"attention_bias=True is not supported for model_type {model_type!r}")

        hidden_size = config["hidden_size"]
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"num_attention_heads ({num_heads}) must divide hidden_size ({hidden_size}) when head_dim is not given")
            head_dim = hidden_size // num_heads

        rope_theta, rope_scaling = _read_rope(config)
        bos = config.get("bos_token_id")
        if bos is None and generation_config:
            bos = generation_config.get("bos_token_id")
        eos_ids = _as_ids(config.get("eos_token_id")) + _as_ids((generation_config or {}).get("eos_token_id"))

        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config["max_position_embeddings"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            model_type=model_type,
            architecture=architecture,
            sliding_window=_read_sliding_window(config, model_type),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: list[str]) -> ModelConfig:
        """Read a GGUF file's metadata (llama.cpp's key names) and its tensors' Hugging Face names.

        ``general.architecture`` is ``llama`` (Llama and Mistral: llama.cpp runs Mistral as
        Llama, with full attention) or ``qwen2``. The LM head is tied when the file has no
        ``output.weight``. End-of-generation ids are the eos token and, where the file names
        them, the end-of-turn and end-of-message tokens.
        """
        arch = metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")

        def key(name: str, default: Any = _REQUIRED) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is _REQUIRED:
                raise ValueError(f"GGUF metadata lacks {arch}.{name}")
            return value

        hidden_size, num_heads = key("embedding_length"), key("attention.head_count")
        head_dim = key("attention.key_length", None) or hidden_size // num_heads
        rotary_dims = key("rope.dimension_count", head_dim)
        if rotary_dims != head_dim:
            raise ValueError(f"partial rotary embeddings ({rotary_dims} of {head_dim} dimensions) are not supported")
        vocab_size = key("vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens") or ()) or None
        if vocab_size is None:
            raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
        eos_ids = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=num_heads,
            num_key_value_heads=key("attention.head_count_kv", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=_read_gguf_rope_scaling(key),
            max_position_embeddings=key("context_length"),
            tie_word_embeddings="lm_head.weight" not in tensor_names,
            attention_bias=arch == "qwen2",
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
            model_type=arch,
            architecture=_DEFAULT_ARCHITECTURE[arch],
        )


_DEFAULT_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _read_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either config layout."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    if rope_type == "default":
        return rope_theta, None
    if rope_type in ("llama3", "yarn"):
        # As transformers does: the pretraining length defaults to the current one.
        params.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return rope_theta, {"rope_type": rope_type, **params}


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type == "default":
        raise ValueError("rope_scaling must be None for default rope")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    missing = [key for key in _ROPE_REQUIRED_KEYS[rope_type] if scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)}")
    factor = scaling.get("factor")
    if factor is not None and not factor > 0:
        raise ValueError(f"rope factor must be positive, got {factor}")


def _read_sliding_window(config: dict[str, Any], model_type: str) -> int | None:
    window = config.get("sliding_window")
    if model_type == "qwen2":
        if config.get("use_sliding_window"):
            # Qwen2 slides only in layers >= max_window_layers; no released checkpoint enables it.
            raise ValueError("qwen2 with use_sliding_window=True is not supported")
        return None
    if model_type == "llama" or window is None or window >= config["max_position_embeddings"]:
        return None
    return window


def _read_gguf_rope_scaling(key) -> dict[str, Any] | None:
    """The rope scaling of a GGUF (``rope.scaling.*`` keys; ``key(name, default)`` reads one)."""
    kind = key("rope.scaling.type", "none")
    factor = key("rope.scaling.factor", None)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = key("rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported")
