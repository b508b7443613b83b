"""The gateway's event loop: uvloop when it is installed, asyncio's own otherwise."""

import asyncio

import pytest

from shardgate.server import event_loop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_runs_on_uvloop_when_it_is_installed():
    pytest.importorskip("uvloop")
    assert event_loop.name() == "uvloop"
    assert event_loop.run(loop_module()).startswith("uvloop")


def test_falls_back_to_asyncios_loop_without_uvloop(monkeypatch):
    monkeypatch.setattr(event_loop, "uvloop", None)
    assert event_loop.name() == "asyncio"
    assert event_loop.run(loop_module()).startswith("asyncio")
