import math

import pytest
import torch

from shardgate.shards import cpu_kernels
from shardgate.shards.sampler import SamplingParams, argmax, sample

GREEDY = SamplingParams(seed=0, temperature=0.0)


def random_logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    logits = random_logits(6)
    tokens, logprobs = sample(logits, [GREEDY] * 6, [0] * 6)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 6


def test_same_seed_same_token_alone_or_in_any_batch():
    logits = random_logits(4)
    params = [SamplingParams(seed=s, temperature=1.0, top_p=0.95) for s in (11, 22, 33, 44)]
    batched, _ = sample(logits, params, [5, 6, 7, 8])
    alone = [sample(logits[i : i + 1], [params[i]], [5 + i])[0][0] for i in range(4)]
    assert batched == alone
    # Reordered, and mixed with greedy rows.
    reordered, _ = sample(torch.stack([logits[2], logits[0], logits[1]]), [params[2], GREEDY, params[1]], [7, 0, 6])
    assert [reordered[0], reordered[2]] == [batched[2], batched[1]]


def test_draw_depends_on_seed_and_output_index():
    logits = torch.zeros(1, 50)  # uniform: any two draws coincide with probability 1/50
    by_seed = {sample(logits, [SamplingParams(seed=s)], [0])[0][0] for s in range(20)}
    by_index = {sample(logits, [SamplingParams(seed=0)], [i])[0][0] for i in range(20)}
    assert len(by_seed) > 5 and len(by_index) > 5
    assert sample(logits, [SamplingParams(seed=3)], [9]) == sample(logits, [SamplingParams(seed=3)], [9])


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = torch.zeros(4)
    draws = 4000
    for i in range(draws):
        counts[sample(logits, [SamplingParams(seed=1)], [i])[0][0]] += 1
    torch.testing.assert_close(counts / draws, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = random_logits(8)
    greedy, _ = sample(logits, [GREEDY] * 8, list(range(8)))
    top_k, _ = sample(logits, [SamplingParams(seed=s, temperature=1.5, top_k=1) for s in range(8)], list(range(8)))
    top_p, _ = sample(logits, [SamplingParams(seed=s, temperature=1.5, top_p=1e-6) for s in range(8)], list(range(8)))
    assert top_k == greedy and top_p == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    top_k = {sample(logits, [SamplingParams(seed=0, top_k=2)], [i])[0][0] for i in range(200)}
    assert top_k == {1, 2}
    top_p = {sample(logits, [SamplingParams(seed=0, top_p=0.85)], [i])[0][0] for i in range(200)}
    assert top_p == {1, 2, 3}  # 0.5 + 0.3 < 0.85, so the 0.15 token is still needed
    top_p = {sample(logits, [SamplingParams(seed=0, top_p=0.75)], [i])[0][0] for i in range(200)}
    assert top_p == {1, 2}


def test_low_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    cold = [sample(logits, [SamplingParams(seed=0, temperature=0.05)], [i])[0][0] for i in range(100)]
    assert cold.count(0) > 90


def test_logprob_is_of_the_raw_logits():
    logits = random_logits(3)
    params = [
        SamplingParams(seed=0, temperature=0.0, logprobs=True),
        SamplingParams(seed=1, temperature=0.7, top_k=5, logprobs=True),
        SamplingParams(seed=2, temperature=0.7, logprobs=False),
    ]
    tokens, logprobs = sample(logits, params, [0, 0, 0])
    raw = torch.log_softmax(logits, dim=-1)
    assert logprobs[0] == pytest.approx(raw[0, tokens[0]].item(), abs=1e-6)
    assert logprobs[1] == pytest.approx(raw[1, tokens[1]].item(), abs=1e-6)
    assert logprobs[2] is None
    assert math.exp(logprobs[0]) == pytest.approx(torch.softmax(logits[0], -1).max().item(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"seed": -1},
        {"seed": 2**64},
    ],
)
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**{"seed": 0, **kwargs})


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "cpu_kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 15, 127, 128, 300, 32000])
def test_argmax_is_torchs_including_ties_and_nan(request, kernels, dtype, vocab):
    if kernels:
        request.getfixturevalue("cpu_kernels_loaded")
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 4, (9, vocab), generator=generator).to(dtype)  # many ties: the first index wins
    logits[0] = float("-inf")
    logits[1, -1] = 100.0  # the maximum in the padded last chunk, or the kernel's tail
    if vocab > 2:
        logits[2, vocab // 2] = logits[2, -1] = float("nan")  # NaN counts as the largest: the first one wins
    assert cpu_kernels.serves_argmax(logits) == kernels
    assert torch.equal(argmax(logits), logits.float().argmax(dim=-1))


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "cpu_kernels"])
def test_bfloat16_logits_sample_as_their_float32_widening(request, kernels):
    """The graph's logits come in the model's dtype: greedy rows take their argmax as they are,
    drawing and logprob rows are widened first; widening is exact, so every answer is the one
    float32 logits of the same values give."""
    if kernels:
        request.getfixturevalue("cpu_kernels_loaded")
    logits = random_logits(6, vocab=300).to(torch.bfloat16)
    params = [
        GREEDY,
        SamplingParams(seed=1, temperature=0.8, top_p=0.9, logprobs=True),
        SamplingParams(seed=0, temperature=0.0, logprobs=True),
        SamplingParams(seed=2, top_k=5),
        GREEDY,
        SamplingParams(seed=3),
    ]
    got = sample(logits, params, [0, 1, 2, 3, 4, 5])
    assert got == sample(logits.float(), params, [0, 1, 2, 3, 4, 5])
    assert got[1][2] is not None and got[1][0] is None
