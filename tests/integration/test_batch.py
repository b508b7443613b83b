"""`shardgate batch` against a real server: an interrupted job resumes to exactly one result per id."""

import json
import signal
import subprocess
import sys
import time


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch_command(address, source, target):
    return [sys.executable, "-m", "shardgate.clients.cli", "batch", str(source), "-o", str(target), "--addr", address, "--concurrency", "4"]


def test_interrupted_job_resumes_without_loss_or_duplicates(tiny_server, tmp_path):
    lines = [
        {"id": f"r{i}", "prompt": f"prompt number {i}", "max_new_tokens": 40, "temperature": 0, "ignore_eos": True} for i in range(200)
    ]
    lines[17] = {"id": "r17", "prompt": "bad", "max_new_tokens": 4, "top_k": -3}  # the server refuses it
    lines[42] = {"id": "r42", "prompt": "bad", "max_new_tokens": 4, "nucleus": 0.9}  # not a parameter
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))

    # Started with SIGINT ignored, as a shell starts a background job: Ctrl-C must still stop it cleanly.
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    job = subprocess.Popen(batch_command(tiny_server.address, source, target), stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint)
    deadline = time.monotonic() + 120
    while not (target.exists() and target.read_text().count("\n") >= 30):  # part way through
        assert job.poll() is None, job.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    assert "interrupted:" in stderr and "run the same command again to resume" in stderr and "Traceback" not in stderr
    first = read_results(target)  # every line whole: the interrupt never tears one
    assert 30 <= len(first) < 200 and len({r["id"] for r in first}) == len(first)

    resumed = subprocess.run(batch_command(tiny_server.address, source, target), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    results = read_results(target)
    assert len(results) == 200 and {r["id"] for r in results} == {f"r{i}" for i in range(200)}
    assert f"{len(first)} skipped" in resumed.stderr and "finished:" in resumed.stderr
    by_id = {r["id"]: r for r in results}
    assert by_id["r17"]["error"]["code"] == "INVALID_ARGUMENT" and by_id["r17"]["error"]["message"].startswith("top_k:")
    assert by_id["r42"]["error"]["code"] == "INVALID_ARGUMENT" and "'nucleus'" in by_id["r42"]["error"]["message"]
    ok = [r for r in results if "error" not in r]
    assert len(ok) == 198 and all(r["usage"]["completion_tokens"] == 40 and r["finish_reason"] == "length" for r in ok)
    with tiny_server.client() as client:  # what was written is the request's own result
        assert by_id["r199"]["text"] == client.generate("prompt number 199", max_new_tokens=40, temperature=0, ignore_eos=True).text


def test_sigterm_stops_a_job_cleanly_like_sigint(tmp_path):
    from fake_inference import start_fake_server

    server = start_fake_server()
    server.fake.stall = True  # every request stays in flight
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": "p"}) + "\n" for i in range(10)))
    try:
        job = subprocess.Popen(batch_command(server.address, source, target), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while sum(call.method == "Generate" for call in server.fake.calls) < 4:  # all four workers wait on the server
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=30)
    finally:
        server.stop()
    assert job.returncode == 130 and "interrupted: 0 done" in stderr and "Traceback" not in stderr
    assert target.read_text() == ""  # cancelled requests are not written: they run on resume
