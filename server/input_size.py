"""How many characters of input one token can stand for at most, read from the tokenizer's
structure, so that a text too long for the context is refused by its length alone, before
anything tokenizes it.

For a text of n characters (Python str length: code points), tokens(text) >= n / (K × L):

- L is the longest string of any token: vocabulary entries and added tokens. A token's string
  is the piece of text it covers as the model sees it (a continuing-subword prefix or a byte
  fallback's "<0x41>" only makes a string longer than what it covers, which errs safe). For
  byte-level tokenizers that text is one character per UTF-8 byte, and every input character
  is at least one byte, so a token still covers at most L input characters. Added tokens are
  matched on the raw text and cover their content.
- K is how many input characters the normalizer may fold into one: 1 for none, Lowercase,
  Prepend, and Replace of a string by one at least as long; 4 for the Unicode normal forms
  (composition folds a character and its combining marks into one, and the longest canonical
  decomposition is 4 code points; compatibility decomposition only ever adds characters).

The bound holds only if no step can drop input or absorb an unbounded run of it into one
token, so any tokenizer with a step not known to be safe gets no bound (None): its inputs are
still tokenized off the event loop, then checked by their token count. Unsafe steps include
normalizers that strip (Strip, StripAccents, BertNormalizer, Precompiled, Replace by something
shorter), pre-tokenizers that drop what they split on (Whitespace, BertPreTokenizer, Split with
behavior Removed), characters no token covers (BPE without an unknown token drops them) and unknown tokens that
cover unbounded text (WordPiece's [UNK] for a long word, WordLevel, fused unknown characters
without byte fallback), added tokens that
swallow the whitespace beside them (lstrip/rstrip), and truncation (the text would be cut).
"""

from __future__ import annotations

import json
import math

from tokenizers import Tokenizer, pre_tokenizers

UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}
LONGEST_CANONICAL_DECOMPOSITION = 4
KEEPING_SPLIT_BEHAVIORS = {"Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"}
BYTE_FALLBACK_TOKENS = {f"<0x{byte:02X}>" for byte in range(256)}


def chars_per_token_bound(tokenizer: Tokenizer) -> int | None:
    """K × L as the module docstring defines them; None when the tokenizer has a step that can
    drop input or cover unbounded text with one token."""
    spec = json.loads(tokenizer.to_str())
    fold = _normalizer_fold(spec.get("normalizer"))
    if fold is None or spec.get("truncation") or not _keeps_everything(spec.get("pre_tokenizer")):
        return None
    model = spec["model"]
    if not _unknowns_bounded(model, _byte_level(spec.get("pre_tokenizer"))):
        return None
    added = spec.get("added_tokens") or []
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None
    vocab = model["vocab"]
    names = vocab.keys() if isinstance(vocab, dict) else (piece for piece, _score in vocab)  # Unigram: [piece, score] pairs
    longest = max((len(name) for name in names), default=1)
    longest = max([longest, *(len(token["content"]) for token in added)])
    return fold * max(1, longest)


def _normalizer_fold(normalizer: dict | None) -> int | None:
    """K: input characters the normalizer may fold into one; None if it may drop characters."""
    if normalizer is None:
        return 1
    kind = normalizer["type"]
    if kind == "Sequence":
        folds = [_normalizer_fold(step) for step in normalizer["normalizers"]]
        return None if None in folds else math.prod(folds)
    if kind in UNICODE_FORMS:
        return LONGEST_CANONICAL_DECOMPOSITION
    if kind in ("Lowercase", "Prepend"):
        return 1
    if kind == "Replace":
        pattern = normalizer["pattern"]
        if "String" in pattern and len(normalizer["content"]) >= len(pattern["String"]) >= 1:
            return 1
    return None


def _keeps_everything(pre_tokenizer: dict | None) -> bool:
    """Whether the pre-tokenizer hands every character on (it may split, never drop)."""
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        return all(_keeps_everything(step) for step in pre_tokenizer["pretokenizers"])
    if kind in ("Split", "Punctuation"):
        return pre_tokenizer.get("behavior", "Isolated") in KEEPING_SPLIT_BEHAVIORS
    return kind in ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts")


def _byte_level(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return False
    if pre_tokenizer["type"] == "Sequence":
        return any(_byte_level(step) for step in pre_tokenizer["pretokenizers"])
    return pre_tokenizer["type"] == "ByteLevel"


def _unknowns_bounded(model: dict, byte_level: bool) -> bool:
    """Whether every character reaches some token and every token covers at most its own string:
    the vocabulary holds every byte (byte-level alphabet or byte fallback), or each unknown
    character becomes one unknown token. (BPE without an unknown token drops characters it
    lacks; fused unknowns, WordPiece's too-long words and WordLevel's unknown words cover runs.)"""
    vocab = model["vocab"]
    names = set(vocab) if isinstance(vocab, dict) else {piece for piece, _score in vocab}
    if model.get("byte_fallback") and BYTE_FALLBACK_TOKENS <= names:
        return True
    if model["type"] != "BPE":
        return False
    if byte_level and set(pre_tokenizers.ByteLevel.alphabet()) <= names:
        return True
    return model.get("unk_token") is not None and not model.get("fuse_unk")
