"""The characters-per-token bound: it never refuses a text that would fit (every text of n
characters makes at least n / bound tokens), and tokenizers that can drop or swallow input get none."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from shardgate.server.input_size import chars_per_token_bound
from shardgate.server.validation import ModelLimits, RequestError
from shardgate.shards.builtin import builtin_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 20, "déjà vu, naïve café — 東京 ñandú " * 20, "    indented code()\n" * 20]


def byte_level_bpe(normalizer=None) -> Tokenizer:
    """A GPT-2-style tokenizer with real merges (some tokens many characters long)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True)])
    return tokenizer


def sentencepiece_style() -> Tokenizer:
    """Llama 2's layout: ▁ for spaces, merges over characters, byte fallback for the rest."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ("▁", "▁t", "▁th", "▁the", "h", "e", "t", "a", "▁a"):
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "a")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tokenizer


BOUNDED = {
    "builtin byte-level": builtin_tokenizer(),
    "trained byte-level BPE": byte_level_bpe(),
    "NFKC then byte-level BPE": byte_level_bpe(normalizers.NFKC()),
    "sentencepiece-style byte fallback": sentencepiece_style(),
}


def test_bounds_follow_the_longest_token_and_the_normalizer():
    assert chars_per_token_bound(builtin_tokenizer()) == 4  # one byte per token, "</s>" the longest string
    plain, folding = chars_per_token_bound(BOUNDED["trained byte-level BPE"]), chars_per_token_bound(BOUNDED["NFKC then byte-level BPE"])
    assert plain >= len("<|im_start|>") and folding == 4 * chars_per_token_bound(byte_level_bpe())
    assert chars_per_token_bound(BOUNDED["sentencepiece-style byte fallback"]) == len("<0x00>")


texts = st.text(max_size=400) | st.text(alphabet="ab \u0301\u0308\u1100\u1161\u11a8\uff21", max_size=400) | st.sampled_from(CORPUS)


@pytest.mark.parametrize("name", sorted(BOUNDED))
@given(text=texts)
@settings(max_examples=150, deadline=None)
def test_no_text_makes_fewer_tokens_than_its_length_over_the_bound(name, text):
    tokenizer = BOUNDED[name]
    bound = chars_per_token_bound(tokenizer)
    assert bound * len(tokenizer.encode(text, add_special_tokens=False).ids) >= len(text)


def _with(**parts) -> Tokenizer:
    tokenizer = byte_level_bpe()
    for name, value in parts.items():
        setattr(tokenizer, name, value)
    return tokenizer


def _dropping_bpe() -> Tokenizer:
    """BPE with no unknown token drops the characters its vocabulary lacks."""
    return Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))


def _fusing_unknowns() -> Tokenizer:
    return Tokenizer(models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], unk_token="<unk>", fuse_unk=True))


def _stripping_added_token() -> Tokenizer:
    tokenizer = byte_level_bpe()
    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    return tokenizer


def _truncating() -> Tokenizer:
    tokenizer = byte_level_bpe()
    tokenizer.enable_truncation(16)
    return tokenizer


UNBOUNDED = {
    "whitespace pre-tokenizer drops spaces": lambda: _with(pre_tokenizer=pre_tokenizers.Whitespace()),
    "split removing its delimiter": lambda: _with(
        pre_tokenizer=pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), "removed"), pre_tokenizers.ByteLevel()])
    ),
    "BERT normalizer strips accents and controls": lambda: _with(normalizer=normalizers.BertNormalizer()),
    "replace by something shorter": lambda: _with(normalizer=normalizers.Replace("  ", " ")),
    "WordPiece's [UNK] for a long word": lambda: Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
    "BPE without an unknown token": _dropping_bpe,
    "fused unknowns": _fusing_unknowns,
    "an added token that strips whitespace": _stripping_added_token,
    "truncation": _truncating,
}


@pytest.mark.parametrize("name", sorted(UNBOUNDED))
def test_tokenizers_that_can_drop_or_swallow_input_get_no_bound(name):
    assert chars_per_token_bound(UNBOUNDED[name]()) is None


def test_the_length_check_refuses_only_texts_over_the_bound():
    limits = ModelLimits(vocab_size=258, max_context_tokens=10, max_embed_tokens=10, max_chars_per_token=4)
    limits.check_length("prompt", "x" * 40, 10)
    with pytest.raises(RequestError) as raised:
        limits.check_length("prompt", "x" * 41, 10)
    assert raised.value.field == "prompt" and "41 characters make more than 10 tokens" in str(raised.value)
    ModelLimits(vocab_size=258, max_context_tokens=10, max_embed_tokens=10).check_length("prompt", "x" * 10**6, 10)  # no bound: no check
