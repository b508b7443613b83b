"""Output processing: turns a request's sampled token ids into what its caller reads.

Fed one token id at a time, it detokenizes incrementally (text is valid UTF-8 at every step),
holds back and cuts at stop strings, and decides when the request ends: a stop string, an EOS
token (unless ignore_eos), or max_new_tokens. It knows nothing of the scheduler or replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from tokenizers import Tokenizer

from shardgate.server.request import FinishReason, SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    """One new token and the text it made visible (maybe empty)."""

    token_id: int
    logprob: float | None
    text: str


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request that ended normally."""

    reason: FinishReason
    text: str
    """Text held back until the end (an incomplete character, a possible stop-string start)."""


@dataclass(frozen=True)
class ErrorEvent:
    """The last event of a request the server could not finish."""

    code: grpc.StatusCode
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent

# Decoding a few prompt tokens before the output gives tokenizers that strip a leading space
# from the first token of a decode (SentencePiece-style) the context they need.
_PROMPT_CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token list, emitting text only when it ends in a whole character.

    Bytes of a character split across tokens decode to U+FFFD until the character is complete,
    so text ending in U+FFFD is held back until the next token (or the end) completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Adds a token; returns the new complete text (maybe empty)."""
        self._ids.append(token_id)
        return self._take(final=False)

    def flush(self) -> str:
        """Returns whatever text is held back, complete or not (at the end of generation)."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        text = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(text) <= len(prefix) or (text.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]


class StopMatcher:
    """Finds stop strings in the generated text and holds back text that may start one."""

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Adds generated text; returns the text now safe to show. Sets `stopped` on a match."""
        if self.stopped or not delta:
            return ""
        search_from = max(0, len(self._text) - max((len(s) for s in self._stop), default=0) + 1)
        self._text += delta
        matches = [i for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
        if matches:
            self.stopped = True
            self._text = self._text[: min(matches)]
            return self._release(len(self._text))
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        """Returns any held-back text (generation ended without a stop string)."""
        return self._release(len(self._text))

    @property
    def text(self) -> str:
        """All text up to any stop string."""
        return self._text

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self._text[self._emitted : upto]
        self._emitted = upto
        return out


class OutputProcessor:
    """One generation request's output: its detokenizer, stop strings and finish rule."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, stop: list[str], eos_token_ids: frozenset[int]
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = StopMatcher(stop)
        self._params = params
        self._eos_token_ids = eos_token_ids
        self.num_tokens = 0
        """Tokens fed so far."""

    def add(self, token_id: int, logprob: float | None) -> tuple[TokenEvent, FinishReason | None]:
        """Feeds the next sampled token; returns its event and, when it ends the request, why
        (the caller then calls finish with that reason)."""
        self.num_tokens += 1
        event = TokenEvent(token_id, logprob if self._params.logprobs else None, self._stop.feed(self._detokenizer.push(token_id)))
        if self._stop.stopped:
            return event, FinishReason.STOP
        if token_id in self._eos_token_ids and not self._params.ignore_eos:
            return event, FinishReason.EOS
        if self.num_tokens >= self._params.max_new_tokens:
            return event, FinishReason.LENGTH
        return event, None

    def finish(self, reason: FinishReason) -> FinishEvent:
        """The last event: the reason and any text held back (none after a stop string)."""
        if self._stop.stopped:
            return FinishEvent(reason, "")
        return FinishEvent(reason, self._stop.feed(self._detokenizer.flush()) + self._stop.flush())
