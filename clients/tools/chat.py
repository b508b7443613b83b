"""`shardgate chat`: a conversation with a server's model, interactive (multi-turn, streamed)
or one-shot (one message in, the reply out, for scripts)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import closing
from typing import TextIO

from shardgate.clients.client import Client

EXIT, RESET = "/exit", "/reset"
HELP = f"[Enter sends a message; {RESET} starts over; {EXIT} or Ctrl-D quits; Ctrl-C stops a reply]"


class ChatSession:
    """The conversation so far (after the system prompt, if any); each `say` adds a turn."""

    def __init__(self, client: Client, system: str | None = None, params: dict | None = None) -> None:
        self.client = client
        self.system = system
        self.params = params or {}
        self.history: list[tuple[str, str]] = []

    def messages(self, text: str) -> list[tuple[str, str]]:
        """The messages a request for the reply to `text` sends."""
        system = [("system", self.system)] if self.system else []
        return [*system, *self.history, ("user", text)]

    def say(self, text: str, out: TextIO) -> str:
        """Streams the reply to `text` into `out` and keeps both turns. Interrupted (Ctrl-C),
        the reply is cancelled on the server and neither turn is kept."""
        parts = []
        with closing(self.client.chat(self.messages(text), stream=True, **self.params)) as deltas:
            for delta in deltas:
                parts.append(delta.text)
                out.write(delta.text)
                out.flush()
        reply = "".join(parts)
        self.history += [("user", text), ("assistant", reply)]
        return reply

    def reset(self) -> None:
        self.history.clear()


def run_interactive(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Reads messages with `read` until /exit or end of input (Ctrl-D), streaming each reply.
    Ctrl-C during a reply cancels it; at the prompt it clears the line."""
    print(HELP, file=err)
    while True:
        try:
            text = read("> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if text == EXIT:
            return 0
        if text == RESET:
            session.reset()
            print("[the conversation starts over]", file=err)
        elif text:
            try:
                session.say(text, out)
                out.write("\n")
            except KeyboardInterrupt:
                print("\n[reply cancelled]", file=err)


def run_once(session: ChatSession, text: str, out: TextIO = sys.stdout) -> int:
    """Streams the reply to one message, then a newline."""
    session.say(text, out)
    out.write("\n")
    return 0
