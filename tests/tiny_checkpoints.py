"""Tiny Hugging Face checkpoints with seeded random weights, written by transformers itself.

Kinds:
- ``llama``: GQA (4 heads / 2 kv heads), untied embeddings, llama3 rope scaling
  that bends frequencies inside the tested positions, saved in several shards.
- ``qwen2``: q/k/v biases, tied embeddings, one kv head (fewer than 2 tensor-parallel
  ranks), 3 layers (not divisible by 2 pipeline stages), an odd vocabulary (301, not
  divisible by 2 ranks, larger than the tokenizer's), eos listed in both config.json and
  generation_config.json.
- ``mistral``: a sliding window (12) shorter than the test prompts, and a
  head_dim (32) that is not hidden_size / heads.

Weights are large (initializer_range 0.2) so greedy decoding has no near-ties;
norm weights and biases get noise too so that they matter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

KINDS = ("llama", "qwen2", "mistral")

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Shardgate serves language models over gRPC, one shard per GPU.",
    "Paged attention keeps keys and values in fixed-size blocks.",
    "Ünïcödé text, emoji 🙂 and numbers 12345 all encode as bytes.",
    "the the the and and of of to to in in is is",
] * 4

_COMMON = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-6
)


def make_checkpoint(kind: str, directory: Path) -> Path:
    """Write a checkpoint of the given kind (config, generation config, safetensors, tokenizer.json) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(KINDS.index(kind))
    if kind == "llama":
        specials, tokenizer_vocab, bos = ["<s>", "</s>"], 300, "<s>"
        config = LlamaConfig(
            **_COMMON,
            vocab_size=300,
            intermediate_size=176,
            num_hidden_layers=3,
            bos_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        model = LlamaForCausalLM(config)
        shard_size = "200KB"
    elif kind == "qwen2":
        specials, tokenizer_vocab, bos = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 296, None
        config = Qwen2Config(
            **{**_COMMON, "num_key_value_heads": 1},
            vocab_size=301,
            intermediate_size=160,
            num_hidden_layers=3,
            bos_token_id=0,
            eos_token_id=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = [2, 0]
        shard_size = "50GB"
    elif kind == "mistral":
        specials, tokenizer_vocab, bos = ["<s>", "</s>"], 320, "<s>"
        config = MistralConfig(
            **_COMMON,
            vocab_size=320,
            head_dim=32,
            intermediate_size=128,
            num_hidden_layers=2,
            bos_token_id=0,
            eos_token_id=1,
            sliding_window=12,
            tie_word_embeddings=False,
        )
        model = MistralForCausalLM(config)
        shard_size = "50GB"
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {KINDS}")

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.float().save_pretrained(directory, max_shard_size=shard_size)
    _byte_level_bpe(specials, tokenizer_vocab, bos).save(str(directory / "tokenizer.json"))
    return directory


def _byte_level_bpe(specials: list[str], vocab_size: int, bos: str | None) -> Tokenizer:
    """A byte-level BPE with a few merges learnt from a fixed text; specials take ids 0, 1, ..."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer
