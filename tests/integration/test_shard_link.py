"""The driver's port, as a hostile or careless caller meets it: a TCP --listen driver started by
torchrun with a shared token answers nothing without it, serves one gateway session at a time
(a restarted gateway takes over once the old session's connection is gone), and refuses a plan
that would reach outside its KV cache or limits, then keeps serving."""

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from servers import launch_server, start_server, wait_until

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.proto.common import free_port
from shardgate.proto.link_auth import link_metadata

KV = str(16 << 20)
TOKEN = "f0e1d2c3b4a5968778695a4b3c2d1e0f"
DECODE_STEPS = 4


def driver_command(listen: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "shardgate.shards.main",
        "--no-compile",
        "--model",
        "builtin:tiny",
        "--listen",
        listen,
        "--kv-cache-memory",
        KV,
        "--decode-steps",
        str(DECODE_STEPS),
        *flags,
    ]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """A torchrun driver on TCP with a token; yields (address, token file, log path)."""
    directory = tmp_path_factory.mktemp("driver")
    token_file = directory / "link-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    address = f"127.0.0.1:{free_port()}"
    log_path = directory / "driver.log"
    with open(log_path, "wb") as log:
        node = subprocess.Popen(driver_command(address, "--listen-token-file", str(token_file)), stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=180)
        yield address, token_file, log_path
    finally:
        node.terminate()
        node.wait(30)


def stub_of(channel: grpc.Channel) -> shard_pb2_grpc.ShardStub:
    return shard_pb2_grpc.ShardStub(channel)


def code_of(method, request, metadata) -> grpc.StatusCode:
    """The status of one call (a streaming one's first message read)."""
    try:
        result = method(request, metadata=metadata, timeout=10)
        if isinstance(result, grpc.Call) and hasattr(result, "__next__"):
            next(result)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


class Session:
    """A hand-made gateway session: the Attach call held open, and the id its calls carry."""

    def __init__(self, channel: grpc.Channel, token: str | None = TOKEN) -> None:
        self.stub = stub_of(channel)
        self.token = token
        self.attach = self.stub.Attach(shard_pb2.AttachRequest(), metadata=link_metadata(token, None), timeout=600)
        self.id = next(self.attach).session_id

    @property
    def metadata(self):
        return link_metadata(self.token, self.id)

    def step(self, request: shard_pb2.StepRequest) -> shard_pb2.StepResponse:
        return self.stub.Step(request, metadata=self.metadata, timeout=30)

    def close(self) -> None:
        self.attach.cancel()


def new_sequence(seq_id: int, blocks: list[int], tokens=(5, 6, 7), start_pos: int = 0) -> shard_pb2.SeqChunk:
    return shard_pb2.SeqChunk(
        seq_id=seq_id,
        token_ids=list(tokens),
        start_pos=start_pos,
        new_block_ids=blocks,
        sample=True,
        sampling=shard_pb2.Sampling(temperature=0, top_p=1),
    )


def test_unauthenticated_callers_get_nothing(driver):
    address, _, _ = driver
    step = shard_pb2.StepRequest(step_id=1, chunks=[new_sequence(1, [0])])
    embed = shard_pb2.EmbedStepRequest(step_id=1, inputs=[shard_pb2.EmbedInput(token_ids=[5], block_ids=[0])])
    with grpc.insecure_channel(address) as channel:
        stub = stub_of(channel)
        for metadata in ((), link_metadata("not-the-token-at-all-0000", None), (("authorization", TOKEN),)):
            for method, request in ((stub.Describe, shard_pb2.DescribeRequest()), (stub.Step, step), (stub.Embed, embed)):
                assert code_of(method, request, metadata) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(stub.Attach, shard_pb2.AttachRequest(), metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_one_session_at_a_time_and_bad_plans_are_refused_without_harm(driver):
    address, _, _ = driver
    with grpc.insecure_channel(address) as first, grpc.insecure_channel(address) as second:
        session = Session(first)
        try:
            other = stub_of(second)
            assert code_of(other.Attach, shard_pb2.AttachRequest(), link_metadata(TOKEN, None)) == grpc.StatusCode.FAILED_PRECONDITION
            for metadata in (link_metadata(TOKEN, None), link_metadata(TOKEN, "0" * 32)):  # no session, a guessed one
                assert code_of(other.Describe, shard_pb2.DescribeRequest(), metadata) == grpc.StatusCode.FAILED_PRECONDITION
                assert code_of(other.Step, shard_pb2.StepRequest(step_id=1), metadata) == grpc.StatusCode.FAILED_PRECONDITION
            info = session.stub.Describe(shard_pb2.DescribeRequest(), metadata=session.metadata, timeout=10)
            blocks, vocab = info.num_kv_blocks, info.model.vocab_size
            assert info.limits.decode_steps == DECODE_STEPS

            expected = session.step(shard_pb2.StepRequest(step_id=1, chunks=[new_sequence(1, [0])])).tokens[0].token_id
            bad_plans = {
                "block id": shard_pb2.StepRequest(step_id=2, chunks=[new_sequence(2, [blocks])]),
                "num_steps": shard_pb2.StepRequest(
                    step_id=3,
                    chunks=[shard_pb2.SeqChunk(seq_id=1, token_ids=[expected], start_pos=3, new_block_ids=[1], sample=True)],
                    num_steps=DECODE_STEPS + 1,
                ),
                "unknown sequence": shard_pb2.StepRequest(
                    step_id=4, chunks=[shard_pb2.SeqChunk(seq_id=99, token_ids=[5], start_pos=3, sample=True)]
                ),
                "token id": shard_pb2.StepRequest(step_id=5, chunks=[new_sequence(3, [2], tokens=(5, vocab))]),
                "position": shard_pb2.StepRequest(step_id=6, chunks=[new_sequence(4, [2], tokens=(5,), start_pos=16)]),
                # a good chunk beside a bad one: the good one must not run either
                "freed": shard_pb2.StepRequest(
                    step_id=7,
                    free_seq_ids=[1],
                    chunks=[
                        new_sequence(5, [3]),
                        shard_pb2.SeqChunk(seq_id=1, token_ids=[expected], start_pos=3, sample=True),
                    ],
                ),
            }
            for name, plan in bad_plans.items():
                with pytest.raises(grpc.RpcError) as refused:
                    session.step(plan)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            bad_embed = shard_pb2.EmbedStepRequest(step_id=1, inputs=[shard_pb2.EmbedInput(token_ids=[5, 6], block_ids=[blocks + 7])])
            assert code_of(session.stub.Embed, bad_embed, session.metadata) == grpc.StatusCode.INVALID_ARGUMENT

            # sequence 1 was not freed by the refused plan: its decode runs and gives the tokens of a fresh run
            decoded = session.step(
                shard_pb2.StepRequest(step_id=8, chunks=[shard_pb2.SeqChunk(seq_id=1, token_ids=[expected], start_pos=3, sample=True)])
            )
            again = session.step(shard_pb2.StepRequest(step_id=9, free_seq_ids=[1], chunks=[new_sequence(6, [4])]))
            assert again.tokens[0].token_id == expected and len(decoded.tokens) == 1
        finally:
            session.close()
        # the session ended with its call: the other channel may attach now
        wait_until(lambda: _attaches(second), timeout=10, what="a new session after the first ended")


def _attaches(channel: grpc.Channel) -> bool:
    try:
        Session(channel).close()
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        return False
    return True


def test_a_gateway_waits_for_the_session_then_a_killed_gateways_session_ends(driver, tmp_path):
    address, token_file, _ = driver
    with grpc.insecure_channel(address) as channel:
        held = Session(channel)

        def release_once_the_gateway_waits():
            try:
                wait_until(lambda: any("serves another gateway" in p.read_text() for p in tmp_path.glob("server-*.log")), timeout=60)
            finally:
                held.close()

        releaser = threading.Thread(target=release_once_the_gateway_waits)
        releaser.start()
        try:
            server = start_server(tmp_path, "--replicas", "0", "--remote-replica", address, "--replica-token-file", str(token_file))
        finally:
            releaser.join()
        try:
            with server.client() as client:
                assert len(client.generate("over the link", max_new_tokens=6, ignore_eos=True).token_ids) == 6
            assert not _attaches(channel)  # the gateway holds the driver
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()
            started = time.monotonic()
            wait_until(lambda: _attaches(channel), timeout=30, what="the killed gateway's session to end")
            assert time.monotonic() - started < 20
        finally:
            server.stop()


@pytest.mark.parametrize(
    "flags, message",
    [
        ((), "did not answer: UNAUTHENTICATED (the driver link needs its token"),
        (
            ("--decode-steps", str(DECODE_STEPS + 4), "--replica-token-file", "TOKEN_FILE"),
            f"takes smaller steps than this gateway plans (decode_steps {DECODE_STEPS + 4} > {DECODE_STEPS})",
        ),
    ],
)
def test_a_gateway_the_driver_would_refuse_stops_in_one_line(driver, tmp_path, flags, message):
    address, token_file, _ = driver
    flags = [str(token_file) if flag == "TOKEN_FILE" else flag for flag in flags]
    gateway = launch_server(tmp_path, "--replicas", "0", "--remote-replica", address, *flags)
    try:
        assert gateway.process.wait(60) == 1
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
    [line] = [line for line in gateway.log().splitlines() if line.startswith("shardgate serve: error: ")]
    assert message in line and "Traceback" not in gateway.log()


@pytest.mark.parametrize(
    "flags, message",
    [
        ((), "is a TCP address: give it mutual TLS"),
        (("--listen-token-file", "/nonexistent/token"), "--listen-token-file /nonexistent/token: cannot read it"),
    ],
)
def test_a_tcp_driver_without_credentials_stops_in_one_line(flags, message):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1")
    command = [sys.executable, "-m", "shardgate.shards.main", "--model", "builtin:tiny", "--listen", f"127.0.0.1:{free_port()}", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("shard: ") and message in line
