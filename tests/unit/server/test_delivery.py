"""Output streams and outboxes: the undelivered count, the bound, and the stall hook."""

import asyncio

import pytest

from shardgate.server.delivery import Outbox, OutputStream
from shardgate.server.tenancy import cache_salt
from shardgate.server.validation import RequestError


def test_a_stream_over_its_bound_wakes_its_listeners_once_when_it_drains():
    async def scenario():
        stream = OutputStream(limit=3)
        woken = []
        stream.made(3)
        assert stream.over
        stream.call_on_room(lambda: woken.append(1))
        waiter = asyncio.create_task(stream.room())
        await asyncio.sleep(0)
        assert not waiter.done()
        stream.delivered(1)
        await asyncio.wait_for(waiter, 1)
        stream.made(1)
        stream.delivered(1)  # no listener left: called once
        return woken, stream.undelivered

    assert asyncio.run(scenario()) == ([1], 2)


def test_outbox_send_returns_once_written_and_calls_on_stall_past_the_timeout():
    async def scenario():
        outbox = Outbox(OutputStream(limit=10), stall_timeout_s=0.1)
        stalls = []
        sender = asyncio.create_task(outbox.send("message", on_stall=lambda: stalls.append(1)))
        message, written = await outbox.next()
        await asyncio.sleep(0.3)
        assert stalls == [1] and not sender.done()  # still waiting for the transport
        written()
        await asyncio.wait_for(sender, 1)
        outbox.put("refusal")
        assert outbox.stream.undelivered == 1
        refusal, refusal_written = await outbox.next()
        refusal_written()
        outbox.wake()
        return message, refusal, outbox.stream.undelivered, await outbox.next(), stalls

    assert asyncio.run(scenario()) == ("message", "refusal", 0, None, [1])


def test_cache_salt_separates_tenants_and_salts_unless_sharing_is_global():
    assert cache_salt(None, "", "per-key") == b"" == cache_salt("t1", "", "global")
    salts = {
        cache_salt("t1", "", "per-key"),
        cache_salt("t2", "", "per-key"),
        cache_salt("t1", "x", "per-key"),
        cache_salt(None, "x", "per-key"),
    }
    assert len(salts) == 4 and all(len(salt) == 32 for salt in salts)
    assert cache_salt("t1", "x", "global") == cache_salt("t2", "x", "global") == cache_salt(None, "x", "per-key")
    with pytest.raises(RequestError, match="^cache_salt: "):
        cache_salt("t1", "x" * 257, "per-key")
