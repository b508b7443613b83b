"""The tokenizer a GGUF file describes in its metadata, rebuilt with the ``tokenizers`` library.

The result encodes as transformers' ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``
does for the same file (token for token, with and without special tokens); its JSON form is
what the gateway loads. Tokenizer models (``tokenizer.ggml.model``):

- ``gpt2``: byte-level BPE. Tokens not spelled in the byte alphabet are respelled as their
  UTF-8 bytes. Text is split by the regex of the ``tokenizer.ggml.pre`` kind where transformers
  knows one, else by GPT-2's.
- ``llama``: SentencePiece BPE with byte fallback; merges from the file, or derived from the
  token scores when it has none.

Tokens typed control (3) are special added tokens, user-defined ones (4) plain added tokens, so
both stay whole in text; so do the bos, eos, unknown and padding tokens (special). bos / eos
are added on encode as ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say (a ``llama`` vocabulary adds bos unless it says not to).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from shardgate.shards.builtin import bytes_to_unicode

_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex its merges were learned with (the kinds transformers maps).
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


def gguf_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a GGUF file's metadata; raises ValueError for an unsupported tokenizer model."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    if kind == "gpt2":
        tokenizer, spelled = _byte_level(metadata, tokens), set(bytes_to_unicode().values())
    elif kind == "llama":
        tokenizer, spelled = _sentencepiece(metadata, tokens), None
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    _add_typed_tokens(tokenizer, tokens, metadata.get("tokenizer.ggml.token_type") or [], spelled)
    named = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding")]
    tokenizer.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in named if i is not None])
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    tokenizer.post_processor = _template(tokens, metadata, add_bos, add_eos)
    return tokenizer


def _byte_level(metadata: dict[str, Any], tokens: list[str]) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(metadata: dict[str, Any], tokens: list[str]) -> Tokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    if metadata.get("tokenizer.ggml.merges"):
        merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, metadata.get("tokenizer.ggml.scores") or [])))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens of the vocabulary, best-scored token first (as
    transformers' ``generate_merges`` orders them)."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])))
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_typed_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int], spelled: set[str] | None) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens. A
    control token outside a byte-level alphabet is a mislabel (as transformers judges) and stays out."""
    control = [token for token, kind in zip(tokens, token_types) if kind == _CONTROL and (spelled is None or set(token) <= spelled)]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in control])
    vocab = tokenizer.get_vocab()
    user_defined = [token for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED and token in vocab]
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in user_defined])


def _template(tokens: list[str], metadata: dict[str, Any], add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """bos before and eos after each sequence, as asked and where the file names them."""
    bos_id, eos_id = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if add_bos and bos_id is not None else None
    eos = tokens[eos_id] if add_eos and eos_id is not None else None
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    special = ([(bos, bos_id)] if bos else []) + ([(eos, eos_id)] if eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
