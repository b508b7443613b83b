"""With the decode step compiled (--compile), every parallel layout's greedy tokens still equal
transformers' on the test checkpoints in float32, with prefix caching too."""

import pytest
import test_hf_parity
from parity_prompts import PROMPTS, SHARED_PREFIX_PROMPTS
from servers import start_server
from test_hf_parity import hf_greedy, serve_greedy

COMPILE = ("--compile", "--max-num-seqs", str(len(PROMPTS)))


@pytest.fixture
def served_logs(monkeypatch):
    """The logs of the servers serve_greedy starts, read once it has stopped them."""
    servers = []

    def start(*args, **kwargs):
        servers.append(start_server(*args, **kwargs))
        return servers[-1]

    monkeypatch.setattr(test_hf_parity, "start_server", start)
    return lambda: [server.log() for server in servers]


def assert_compiled(logs: list[str], ranks: int) -> None:
    """Every rank compiled the buckets 1, 2, 4 and loaded the paged decode kernel."""
    [log] = logs
    assert log.count("compiled 3 decode buckets (1,2,4)") == ranks, log
    assert log.count("CPU decode kernels ready") == ranks, log
    assert "compile failed" not in log and "kernel not built" not in log


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_compiled_layouts_equal_transformers(tp, pp, checkpoint, tmp_path, served_logs):
    # qwen2: 1 kv head < tp, vocabulary 301 not divisible by tp, 3 layers not divisible by pp.
    model_dir = checkpoint("qwen2")
    served = serve_greedy(model_dir, tmp_path, *COMPILE, "--tp", str(tp), "--pp", str(pp))
    assert served == hf_greedy(model_dir, PROMPTS)
    assert_compiled(served_logs(), tp * pp)


def test_compiled_prefix_cached_tokens_equal_transformers(checkpoint, tmp_path, served_logs):
    model_dir = checkpoint("mistral")  # and its sliding window
    served = serve_greedy(model_dir, tmp_path, *COMPILE, "--block-size", "8", prompts=SHARED_PREFIX_PROMPTS, first_alone=True)
    assert served == hf_greedy(model_dir, SHARED_PREFIX_PROMPTS)
    assert_compiled(served_logs(), 1)
