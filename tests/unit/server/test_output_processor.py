import pytest
from tokenizers import Tokenizer

from shardgate.server.output_processor import FinishEvent, IncrementalDetokenizer, OutputProcessor, StopMatcher
from shardgate.server.request import FinishReason, SamplingParams
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


def params(max_new_tokens=8, ignore_eos=False, logprobs=False):
    return SamplingParams(max_new_tokens, 0.0, 1.0, 0, 0, ignore_eos, logprobs)


EOS = 257


def feed(tokenizer, token_ids, params, stop=(), prompt_ids=()):
    """Feeds tokens until the processor says the request ends; returns (events, finish event)."""
    processor = OutputProcessor(tokenizer, list(prompt_ids), params, list(stop), frozenset({EOS}))
    events = []
    for token_id in token_ids:
        event, reason = processor.add(token_id, -0.5)
        events.append(event)
        if reason is not None:
            return events, processor.finish(reason)
    return events, None


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    "tokens, kwargs, reason, count, text",
    [
        ("abcdef", dict(max_new_tokens=4), FinishReason.LENGTH, 4, "abcd"),
        (["a", "b", EOS, "c"], {}, FinishReason.EOS, 3, "ab"),
        (["a", EOS, "b", "c"], dict(ignore_eos=True, max_new_tokens=3), FinishReason.LENGTH, 3, "ab"),
        ("one STOP two", dict(stop=["STOP"], max_new_tokens=50), FinishReason.STOP, 8, "one "),
    ],
)
def test_finish_reasons(byte_tokenizer, tokens, kwargs, reason, count, text):
    stop = kwargs.pop("stop", ())
    token_ids = [t if t == EOS else ids(byte_tokenizer, t)[0] for t in tokens]
    events, finish = feed(byte_tokenizer, token_ids, params(**kwargs), stop)
    assert finish.reason is reason and len(events) == count
    assert "".join(e.text for e in events) + finish.text == text


def test_logprobs_only_when_asked(byte_tokenizer):
    token_ids = ids(byte_tokenizer, "ab")
    without, _ = feed(byte_tokenizer, token_ids, params())
    with_them, _ = feed(byte_tokenizer, token_ids, params(logprobs=True))
    assert [e.logprob for e in without] == [None, None] and [e.logprob for e in with_them] == [-0.5, -0.5]


def test_the_held_back_tail_comes_with_the_finish(byte_tokenizer):
    token_ids = ids(byte_tokenizer, "ab🦊")[:3]  # ends inside the emoji
    events, finish = feed(byte_tokenizer, token_ids, params(max_new_tokens=3), stop=["bz"])
    assert [e.text for e in events] == ["a", "", ""] and finish == FinishEvent(FinishReason.LENGTH, "b\ufffd")


def test_the_first_token_keeps_its_leading_space_after_the_prompt():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁": 3}
    tokenizer = Tokenizer(models.Unigram([(piece, -1.0) for piece in vocab], unk_id=0))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    assert tokenizer.decode([2]) == "world"  # alone, the leading space is stripped
    events, _ = feed(tokenizer, [2], params(max_new_tokens=1), prompt_ids=[1])
    assert events[0].text == " world"
