"""Greedy tokens served through the gRPC API equal transformers' generate on the same weights."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from parity_prompts import NEW_TOKENS, PROMPTS, SHARED_PREFIX_PROMPTS
from servers import start_server
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def hf_greedy(model_dir, prompts: list[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: always NEW_TOKENS tokens
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=True).ids])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        outputs.append(generated[0, ids.shape[1] :].tolist())
    return outputs


def serve_greedy(model_dir, tmp_path, *flags: str, prompts: list[str] = PROMPTS, first_alone: bool = False) -> list[list[int]]:
    """The prompts served concurrently through the gRPC API (the first one before the others
    with first_alone); greedy tokens of each."""
    # A small token budget forces chunked prefill while other requests decode.
    server = start_server(
        tmp_path, "--model", str(model_dir), "--dtype", "float32", "--max-batch-tokens", "16", "--kv-cache-memory", str(32 << 20), *flags
    )
    try:

        def generate(prompt):
            with server.client() as client:
                completion = client.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
                cached.append(completion.usage.cached_tokens)
                return completion.token_ids

        cached: list[int] = []
        done = [generate(prompts[0])] if first_alone else []
        with ThreadPoolExecutor(len(prompts)) as pool:
            done += list(pool.map(generate, prompts[len(done) :]))
        if first_alone and "--no-prefix-caching" not in flags:
            assert sum(cached) > 0  # the shared prefix did come from the cache
        return done
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_greedy_tokens_equal_transformers(kind, checkpoint, tmp_path):
    model_dir = checkpoint(kind)
    assert serve_greedy(model_dir, tmp_path) == hf_greedy(model_dir, PROMPTS)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_parallel_layouts_equal_one_process_and_transformers(kind, tp, pp, checkpoint, tmp_path):
    # qwen2: 1 kv head < tp, vocabulary 301 not divisible by tp, 3 layers not divisible by pp.
    model_dir = checkpoint(kind)
    served = serve_greedy(model_dir, tmp_path, "--tp", str(tp), "--pp", str(pp))
    assert served == hf_greedy(model_dir, PROMPTS)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_prefix_cached_greedy_tokens_equal_transformers(kind, checkpoint, tmp_path):
    # The first request fills the cache; the others share its blocks, some while it still decodes.
    model_dir = checkpoint(kind)
    served = serve_greedy(model_dir, tmp_path, "--block-size", "8", prompts=SHARED_PREFIX_PROMPTS, first_alone=True)
    assert served == hf_greedy(model_dir, SHARED_PREFIX_PROMPTS)


def test_prefix_cached_tokens_equal_transformers_with_pipeline_and_tensor_parallelism(checkpoint, tmp_path):
    model_dir = checkpoint("llama")
    served = serve_greedy(
        model_dir, tmp_path, "--tp", "2", "--pp", "2", "--block-size", "8", prompts=SHARED_PREFIX_PROMPTS, first_alone=True
    )
    assert served == hf_greedy(model_dir, SHARED_PREFIX_PROMPTS)
