"""Fixtures of the client tests: the in-process fake server (tests/fake_inference.py) and a
runner for AsyncClient calls."""

import asyncio

import pytest
from fake_inference import start_fake_server

from shardgate.clients import AsyncClient


@pytest.fixture
def server():
    running = start_fake_server()
    yield running
    running.stop()


@pytest.fixture
def fake(server):
    return server.fake


@pytest.fixture
def run_async():
    """run_async(address, use, **options) runs `await use(client)` with an AsyncClient(address,
    **options) in a fresh event loop and returns its result."""

    def run(address, use, **options):
        async def main():
            async with AsyncClient(address, **options) as client:
                return await use(client)

        return asyncio.run(main())

    return run
