import pytest
from tokenizers import Tokenizer

from shardgate.server.output_processor import IncrementalDetokenizer, StopMatcher
from shardgate.shards.builtin import builtin_tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    return builtin_tokenizer()


def stream(tokenizer: Tokenizer, text: str, stop: list[str] = ()) -> tuple[list[str], StopMatcher]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok, matcher = IncrementalDetokenizer(tokenizer, prompt_ids=[]), StopMatcher(list(stop))
    pieces = [matcher.feed(detok.push(i)) for i in ids]
    pieces.append(matcher.feed(detok.flush()) + ("" if matcher.stopped else matcher.flush()))
    return pieces, matcher


def test_multibyte_characters_are_held_until_complete(byte_tokenizer):
    text = "héllo 🦊 wörld"
    pieces, _ = stream(byte_tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(byte_tokenizer.encode("🦊", add_special_tokens=False).ids) == 4 and "🦊" in pieces  # one piece, after 4 tokens


def test_incomplete_tail_is_flushed_at_the_end(byte_tokenizer):
    ids = byte_tokenizer.encode("a🦊", add_special_tokens=False).ids[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(byte_tokenizer, prompt_ids=[])
    assert "".join(detok.push(i) for i in ids) == "a"
    assert detok.flush() == "\ufffd"


def test_stop_string_is_not_emitted_even_across_tokens(byte_tokenizer):
    pieces, matcher = stream(byte_tokenizer, "one two STOP three", stop=["STOP"])
    assert "".join(pieces) == "one two " and matcher.stopped and matcher.text == "one two "


def test_partial_stop_prefix_is_released_when_it_diverges(byte_tokenizer):
    pieces, matcher = stream(byte_tokenizer, "a STOx b", stop=["STOP"])
    assert "".join(pieces) == "a STOx b" and not matcher.stopped
    assert pieces[3] == "" and pieces[4] == ""  # "S", "T" held back while they may start STOP


def test_earliest_of_several_stop_strings_wins(byte_tokenizer):
    pieces, matcher = stream(byte_tokenizer, "xx END yy", stop=["yy", "END"])
    assert "".join(pieces) == "xx " and matcher.stopped
