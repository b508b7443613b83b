"""Tiny GGUF checkpoints written with the ``gguf`` package's writer, as llama.cpp's converter lays
them out: ``blk.N.*`` names, Llama query/key rows interleaved per head, norms and biases in F32,
the matrices in the asked tensor type, no ``output.weight`` when the embeddings are tied, and a
small byte-level BPE tokenizer with ChatML control tokens in the metadata.

Matrices in F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are a seeded transformers model's weights,
quantized by ``gguf.quants.quantize``. The package cannot quantize to Q4_K, Q5_K or Q6_K, so those
matrices are raw blocks of seeded random bytes with the block's f16 scale fields overwritten by
small finite values (any bit pattern is a valid block otherwise): the weights are whatever those
blocks decode to, the same for every reader that dequantizes them with the ``gguf`` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from shardgate.shards.builtin import bytes_to_unicode

K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
VOCAB_SIZE = 300

# Byte offset and value of the f16 scale fields of one block (d, then dmin where the format has one),
# chosen so that weights decode to roughly ±0.1 around zero.
_K_SCALES = {"Q4_K": ((0, 4e-4), (2, 3e-3)), "Q5_K": ((0, 2e-4), (2, 3e-3)), "Q6_K": ((208, 5e-5),)}

_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path: Path, tensor_type: str = "F32", arch: str = "llama", tied: bool = False, seed: int = 0) -> Path:
    """Write a two-layer model of ``arch`` (llama or qwen2) with matrices in ``tensor_type``.

    K-quants need rows of whole 256-value blocks: hidden 256, intermediate 512. The other types
    get hidden 64 and intermediate 96 (half of 96 is not a whole number of 32-value blocks)."""
    torch.manual_seed(seed)
    hidden, intermediate = (256, 512) if tensor_type in K_QUANTS else (64, 96)
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    for name, tensor in state.items():  # norms and biases away from their init, so that they matter
        if tensor.ndim == 1:
            state[name] = tensor + np.random.default_rng(seed).normal(0, 0.1, tensor.shape).astype(np.float32)

    path = Path(path)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch} {tensor_type}")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // 4)
    writer.add_vocab_size(VOCAB_SIZE)
    _add_tokenizer(writer)

    rng = np.random.default_rng(seed + 1)
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = 4 if "q_proj" in name else 2
            tensor = _interleave(tensor, heads)
        _add_tensor(writer, _gguf_name(name), tensor, tensor_type, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def _interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``permute``: each head's two rotary halves interleaved row by row."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensor(writer: GGUFWriter, name: str, tensor: np.ndarray, tensor_type: str, rng: np.random.Generator) -> None:
    if tensor.ndim == 1 or tensor_type == "F32":
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    elif tensor_type == "F16":
        writer.add_tensor(name, tensor.astype(np.float16))
    elif tensor_type in K_QUANTS:
        writer.add_tensor(name, _random_k_blocks(tensor.shape, tensor_type, rng), raw_dtype=GGMLQuantizationType[tensor_type])
    else:
        qtype = GGMLQuantizationType[tensor_type]
        writer.add_tensor(name, quantize(np.ascontiguousarray(tensor), qtype), raw_dtype=qtype)


def _random_k_blocks(shape: tuple[int, ...], tensor_type: str, rng: np.random.Generator) -> np.ndarray:
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[tensor_type]]
    rows, columns = shape
    blocks = rng.integers(0, 256, (rows, columns // block_size, block_bytes), dtype=np.uint8)
    for offset, scale in _K_SCALES[tensor_type]:
        blocks[:, :, offset : offset + 2] = np.array([scale], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _add_tokenizer(writer: GGUFWriter) -> None:
    """Byte-level BPE: the ChatML specials (control), the 256 byte symbols, then merged letter pairs."""
    alphabet = list(bytes_to_unicode().values())
    letters = "etaoinshrdlu"
    pairs = [a + b for a in letters for b in letters][: VOCAB_SIZE - len(SPECIAL_TOKENS) - len(alphabet)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*SPECIAL_TOKENS, *alphabet, *pairs])
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(alphabet) + len(pairs)))
    writer.add_token_merges([f"{pair[0]} {pair[1]}" for pair in pairs])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
