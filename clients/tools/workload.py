"""Seeded synthetic workloads for the benchmark: prompts of random token ids (or, for protocols
that take only text, of common words) with lengths drawn from a distribution (or fixed), and
Poisson arrival times for open-loop load."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Lengths:
    """A length distribution: uniform integers in [low, high] (low == high: fixed)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"lengths need 1 <= low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """`"32"` (fixed) or `"16:64"` (uniform in [16, 64])."""
        low, _, high = text.partition(":")
        try:
            return cls(int(low), int(high or low))
        except ValueError as error:
            raise ValueError(f"bad length {text!r}: use N or LOW:HIGH ({error})") from None

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class WorkloadConfig:
    """What the benchmark sends."""

    num_requests: int = 64
    """Requests measured (warmup not counted)."""
    prompt_len: Lengths = Lengths(32, 32)
    """Prompt lengths in tokens."""
    output_len: Lengths = Lengths(128, 128)
    """max_new_tokens of each request."""
    seed: int = 0
    """Seed of lengths, prompt tokens and arrival times: the same seed, the same workload."""
    shared_prefix_len: int = 0
    """Tokens every prompt starts with (the same ones), before its own prompt_len tokens."""

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        if self.shared_prefix_len < 0:
            raise ValueError("--shared-prefix-len must be >= 0")


@dataclass(frozen=True)
class WorkItem:
    prompt_ids: list[int]
    max_new_tokens: int
    prompt_text: str | None = None
    """The prompt as text (prompt_ids are its tokens), for a cross-protocol run; None: send the ids."""


def make_workload(config: WorkloadConfig, vocab_size: int, avoid_ids: frozenset[int] = frozenset()) -> list[WorkItem]:
    """The requests: prompt token ids drawn uniformly from the vocabulary except avoid_ids
    (end-of-sequence and other special tokens), each after the shared prefix."""
    rng = random.Random(config.seed)
    choices = [t for t in range(vocab_size) if t not in avoid_ids]
    # Its own stream: adding a prefix leaves the rest of the workload unchanged.
    prefix_rng = random.Random(config.seed + 2)
    prefix = [prefix_rng.choice(choices) for _ in range(config.shared_prefix_len)]
    items = []
    for _ in range(config.num_requests):
        prompt_len, output_len = config.prompt_len.draw(rng), config.output_len.draw(rng)
        items.append(WorkItem(prefix + [rng.choice(choices) for _ in range(prompt_len)], output_len))
    return items


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Arrival times in seconds from 0 of a Poisson process of `rate` requests per second."""
    if rate <= 0:
        raise ValueError("--rate must be > 0")
    rng = random.Random(seed + 1)  # not the workload's stream: changing the rate keeps the prompts
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times


def make_embed_texts(config: WorkloadConfig) -> list[str]:
    """Texts for an embedding load: prompt_len words of random letters each."""
    rng = random.Random(config.seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(config.prompt_len.draw(rng)))
        for _ in range(config.num_requests)
    ]


# Common English words: text prompts read as text to every tokenizer (no rare byte sequences).
WORDS = (
    "the of and to in is it that for on with as was at by be this have from or one had not but what all were when we there can "
    "an your which their said if do will each about how up out them then she many some so these would other into has more her "
    "two like him see time could no make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must because does part even place well"
).split()


async def text_workload(config: WorkloadConfig, tokenize: Callable[[str], Awaitable[list[int]]]) -> list[WorkItem]:
    """The workload as text prompts, for protocols that take only text (and to send every
    protocol the same input): seeded words, as many as fit in each prompt's token length as
    `tokenize` (the server's own tokenizer, special tokens included) counts them. Each item's
    prompt_ids are its text's tokens, so a prompt may fall a token or two short of its length."""
    rng = random.Random(config.seed)
    prefix = ""
    if config.shared_prefix_len:
        prefix_rng = random.Random(config.seed + 2)
        prefix_words = [prefix_rng.choice(WORDS) for _ in range(config.shared_prefix_len)]  # a word is at least one token
        prefix = (await _fit(lambda k: " ".join(prefix_words[:k]), config.shared_prefix_len, tokenize))[0] + " "
    items = []
    for _ in range(config.num_requests):
        prompt_len, output_len = config.prompt_len.draw(rng), config.output_len.draw(rng)
        words = [rng.choice(WORDS) for _ in range(prompt_len)]
        text, ids = await _fit(lambda k, words=words: prefix + " ".join(words[:k]), config.shared_prefix_len + prompt_len, tokenize)
        items.append(WorkItem(ids, output_len, text))
    return items


async def _fit(text_of: Callable[[int], str], budget: int, tokenize: Callable[[str], Awaitable[list[int]]]) -> tuple[str, list[int]]:
    """The text of the most words k (at least 1) whose tokens fit in `budget`, found by bisection
    (the count grows with k), and its token ids."""
    low, high = 1, budget
    while low < high:
        middle = (low + high + 1) // 2
        if len(await tokenize(text_of(middle))) <= budget:
            low = middle
        else:
            high = middle - 1
    text = text_of(low)
    return text, await tokenize(text)
