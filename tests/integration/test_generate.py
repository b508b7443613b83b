"""Generation through the real gateway and shard process on the built-in model."""


def test_model_info_describes_the_builtin_model(client):
    info = client.model_info()
    assert info.model == "builtin:tiny" and info.model_type == "llama"
    assert info.vocab_size > 256 and info.dtype == "float32" and (info.tp, info.pp, info.replicas) == (1, 1, 1)
    assert info.kv_capacity_tokens[0] > 0 and info.max_context_tokens <= info.kv_capacity_tokens[0]
    assert list(info.devices) == ["cpu"] and list(info.eos_token_ids)


def test_greedy_unary_and_stream_agree(client):
    unary = client.generate("Hello there", max_new_tokens=24, temperature=0, ignore_eos=True)
    assert len(unary.token_ids) == 24 and unary.finish_reason == "length"
    deltas = list(client.stream("Hello there", max_new_tokens=24, temperature=0, ignore_eos=True))
    assert [t for d in deltas for t in d.token_ids] == unary.token_ids
    # A message per step (--decode-steps 1, the default), or the tokens of several when the stream fell behind.
    assert 1 < len(deltas) <= 24
    assert "".join(d.text for d in deltas) == unary.text
    last = deltas[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 24
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    prompt_tokens = len(client.tokenize("Hello there", add_special_tokens=True))
    assert last.usage.prompt_tokens == prompt_tokens
    assert 0 <= last.usage.queue_time_s <= last.usage.time_to_first_token_s


def test_token_id_prompt_equals_text_prompt(client):
    ids = client.tokenize("same prompt", add_special_tokens=True)
    by_text = client.generate("same prompt", max_new_tokens=8, temperature=0, ignore_eos=True)
    by_ids = client.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert by_text.token_ids == by_ids.token_ids and by_text.usage.prompt_tokens == len(ids)


def test_stream_messages_hold_back_split_characters(client):
    # The byte-level model emits raw bytes: multi-byte characters arrive over several tokens.
    for seed in range(6):
        deltas = list(client.stream("é🦊", max_new_tokens=48, temperature=1.0, seed=seed, ignore_eos=True))
        for delta in deltas[:-1]:
            assert not delta.text.endswith("\ufffd"), delta.text  # never a half character mid-stream


def test_logprobs_are_returned_per_token(client):
    result = client.generate("logprobs", max_new_tokens=5, temperature=0, ignore_eos=True, logprobs=True)
    assert len(result.logprobs) == 5 and all(lp <= 0 for lp in result.logprobs)
    assert not client.generate("logprobs", max_new_tokens=5, ignore_eos=True).logprobs


def test_stop_string_ends_generation_without_it(client):
    free = client.generate("stop test", max_new_tokens=40, temperature=0, ignore_eos=True)
    text = free.text
    # pick a stop string from the middle of the greedy text, avoiding replacement characters
    start = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    stopped = client.generate("stop test", max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]
    streamed = list(client.stream("stop test", max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
    assert "".join(d.text for d in streamed) == stopped.text and streamed[-1].finish_reason == "stop"


def test_eos_ends_generation_unless_ignored(client):
    eos = client.model_info().eos_token_ids[0]
    # Hot sampling on the seeded built-in model reaches EOS for some of these seeds (deterministic).
    hits = 0
    for seed in range(40):
        result = client.generate("eos?", max_new_tokens=64, temperature=2.0, seed=seed)
        if eos not in result.token_ids:
            assert result.finish_reason == "length" and len(result.token_ids) == 64
            continue
        hits += 1
        assert result.finish_reason == "eos" and result.token_ids.index(eos) == len(result.token_ids) - 1
        ignored = client.generate("eos?", max_new_tokens=64, temperature=2.0, seed=seed, ignore_eos=True)
        assert len(ignored.token_ids) == 64 and ignored.token_ids[: len(result.token_ids)] == result.token_ids
    assert hits > 0


def test_seeded_sampling_repeats_alone_and_in_a_batch(client, tiny_server):
    from concurrent.futures import ThreadPoolExecutor

    params = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = client.generate("seeded", **params).token_ids
    assert client.generate("seeded", **params).token_ids == alone
    assert client.generate("seeded", **dict(params, seed=99)).token_ids != alone

    def one(i):
        with tiny_server.client() as c:
            if i % 2:
                return c.generate(f"other prompt {i} " * (i % 5 + 1), max_new_tokens=20, temperature=1.0, ignore_eos=True).token_ids
            return c.generate("seeded", **params).token_ids

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(results[i] == alone for i in range(0, 8, 2))


def test_tokenize(client):
    ids = client.tokenize("héllo")
    assert len(ids) == 6  # byte-level: h, 2 bytes of é, l, l, o
    with_bos = client.tokenize("héllo", add_special_tokens=True)
    assert with_bos[-6:] == ids and len(with_bos) == 7
