"""The threads that process inputs (tokenize, render chat templates) off the event loop.

Work that grows with an input's size never runs on the event loop: one big prompt must not
stall every stream the gateway serves. Threads suffice because the tokenizer releases the GIL
while it encodes (validation.encode), and the Python parts (templates, id lists) yield it every
switch interval. Callers waiting for the threads are bounded: over the bound a call gets
RESOURCE_EXHAUSTED at once, as admission answers, instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from shardgate.server.config import TokenizerPoolConfig
from shardgate.server.validation import RequestError

T = TypeVar("T")


class TokenizerPool:
    def __init__(self, config: TokenizerPoolConfig) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(config.threads, thread_name_prefix="tokenizer")
        self.pending = 0
        """Calls waiting for or in a thread."""

    async def run(self, work: Callable[[], T]) -> T:
        """work() on a pool thread; its exceptions (RequestError for bad input) reach the caller.
        Cancelling the awaiting task drops work that has not started."""
        if self.pending >= self.config.max_pending:
            bound = f"--max-tokenizing-requests {self.config.max_pending}"
            message = f"{self.pending} calls wait for the tokenizer: the bound ({bound}); retry later"
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_tokenizing_requests", message)
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self.pending -= 1

    def close(self) -> None:
        """Drops queued work; a running item ends on its own (its caller has gone)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
