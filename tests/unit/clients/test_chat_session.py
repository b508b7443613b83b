"""`shardgate chat`'s session (clients/tools/chat.py) against the fake server: the history each
request sends, reset, the interactive loop's commands, and a reply interrupted by Ctrl-C."""

import io

import pytest

from shardgate.clients import Client
from shardgate.clients.tools.chat import ChatSession, run_interactive, run_once


@pytest.fixture
def session(server):
    with Client(server.address, timeout=10) as client:
        yield ChatSession(client, system="Be brief.", params={"max_new_tokens": 3})


def sent_messages(call) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in call.request.messages.messages]


def scripted(*lines):
    """A `read` that returns the lines (raising the exceptions among them), then end of input."""
    queue = list(lines)

    def read(prompt: str) -> str:
        item = queue.pop(0) if queue else EOFError()
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_each_request_sends_the_system_prompt_and_the_history(session, fake):
    out = io.StringIO()
    assert session.say("hi", out) == "abc" and run_once(session, "more", out) == 0
    assert out.getvalue() == "abcabc\n"
    assert sent_messages(fake.calls[0]) == [("system", "Be brief."), ("user", "hi")]
    assert sent_messages(fake.calls[1]) == [("system", "Be brief."), ("user", "hi"), ("assistant", "abc"), ("user", "more")]
    assert fake.calls[1].request.max_new_tokens == 3
    session.reset()
    assert session.messages("x") == [("system", "Be brief."), ("user", "x")]


def test_interactive_commands_and_end_of_input(session, fake):
    out, err = io.StringIO(), io.StringIO()
    assert run_interactive(session, scripted("hi", "", "/reset", "again", KeyboardInterrupt(), "  "), out, err) == 0  # ends on Ctrl-D
    assert out.getvalue() == "abc\nabc\n\n\n" and "[the conversation starts over]" in err.getvalue()
    system = ("system", "Be brief.")
    assert [sent_messages(call) for call in fake.calls] == [[system, ("user", "hi")], [system, ("user", "again")]]
    assert run_interactive(session, scripted("/exit", "never read"), out, err) == 0 and len(fake.calls) == 2


class InterruptingOutput(io.StringIO):
    """Ctrl-C while the first reply is being written."""

    def write(self, text: str) -> int:
        if text and not self.getvalue():
            super().write(text)
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_during_a_reply_cancels_it_and_keeps_the_session(session, fake):
    out, err = InterruptingOutput(), io.StringIO()
    assert run_interactive(session, scripted("first", "second"), out, err) == 0
    assert "[reply cancelled]" in err.getvalue()
    assert session.history == [("user", "second"), ("assistant", "abc")]  # the cancelled exchange is not kept
    assert sent_messages(fake.calls[1]) == [("system", "Be brief."), ("user", "second")]
