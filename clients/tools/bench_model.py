"""`shardgate bench --make-model DIR`: the benchmark's model, a Llama of about 150M parameters
with seeded random weights (safetensors, bfloat16) and a byte-level BPE tokenizer.json.
It loads in `shardgate serve --model DIR` and in transformers' AutoModelForCausalLM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRAINING_TEXT = """\
Shardgate serves transformer language models over gRPC. A gateway validates, tokenizes, queues
and batches requests; replicas of shard processes run the model, split across devices by tensor
and pipeline parallelism, and stream tokens back as they are produced. Continuous batching lets
requests join and leave between decode steps; a paged key-value cache keeps every sequence's
keys and values in fixed-size blocks, so memory is shared without fragmentation.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
In the beginning the universe was created. This has made a lot of people very angry and been
widely regarded as a bad move. It was the best of times, it was the worst of times, it was the
age of wisdom, it was the age of foolishness. Call me Ishmael. Some years ago, never mind how
long precisely, having little or no money in my purse, I thought I would sail about a little.
0123456789 + - * / = < > ( ) [ ] { } ; : , . ! ? ' " # $ % & @ ^ _ ` | ~
"""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BOS_ID, EOS_ID = 1, 2


@dataclass(frozen=True)
class BenchModelShape:
    """The model's size (the defaults are the benchmark model; tests use smaller ones)."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    max_position_embeddings: int = 2048


def make_tokenizer(vocab_size: int):
    """A byte-level BPE learnt from TRAINING_TEXT, padded with `<extra_N>` special tokens to
    exactly vocab_size ids, so every id the model can emit decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    size = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([AddedToken(f"<extra_{n}>", special=True) for n in range(vocab_size - size)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return tokenizer


def make_bench_model(directory: Path, shape: BenchModelShape = BenchModelShape(), seed: int = 0) -> Path:
    """Writes config.json, generation_config.json, model.safetensors and tokenizer.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # transformers' own seeded initialisation
    model.to(torch.bfloat16).save_pretrained(directory)
    tokenizer = make_tokenizer(shape.vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
