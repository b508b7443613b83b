"""Nothing crosses a process boundary as pickle, and no checkpoint is unpickled."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ["proto", "server", "shards", "clients"]
FORBIDDEN = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b", re.M), "a pickle-family import"),
    (
        re.compile(r"\b(all_gather_object|broadcast_object_list|gather_object|scatter_object_list|send_object_list|recv_object_list)\b"),
        "a torch.distributed *_object collective (pickles its payload)",
    ),
    (re.compile(r"multiprocessing\.(Queue|Pipe|Manager)|mp\.(Queue|Pipe)"), "a multiprocessing queue or pipe (pickles)"),
]
TORCH_LOAD = re.compile(r"torch\.load\((?P<args>[^)]*)\)")


def sources():
    for directory in PACKAGE_DIRS:
        yield from (p for p in (ROOT / directory).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def test_scan_covers_the_package():
    names = {p.name for p in sources()}
    assert {"executor.py", "engine.py", "weights.py", "client.py"} <= names


def test_no_pickle_on_any_path():
    problems = []
    for path in sources():
        text = path.read_text()
        for pattern, what in FORBIDDEN:
            problems += [f"{path.relative_to(ROOT)}: {what}: {m.group(0)!r}" for m in pattern.finditer(text)]
        for match in TORCH_LOAD.finditer(text):
            if "weights_only=True" not in match.group("args"):
                problems.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert problems == []


def test_the_scan_catches_what_it_should():
    samples = ["import pickle", "dist.broadcast_object_list(x)", "q = multiprocessing.Queue()"]
    assert all(any(p.search(s) for p, _ in FORBIDDEN) for s in samples)
    assert "weights_only=True" not in TORCH_LOAD.search("torch.load(path)").group("args")
