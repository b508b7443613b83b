"""Turns a stream of token ids into a stream of text that is valid UTF-8 at every step and
never shows a stop string."""

from __future__ import annotations

from tokenizers import Tokenizer

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
