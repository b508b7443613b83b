"""Regenerates the protobuf and gRPC stubs beside the .proto files.

Run `python -m shardgate.proto.generate` after editing a .proto; CI runs it with `--check`
and fails when the checked-in stubs differ from what the .proto files generate.
"""

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("config.proto", "inference.proto", "kserve_v2.proto", "shard.proto")
# The .proto files are compiled as if they lived at shardgate/proto/, so the generated
# modules import each other as `shardgate.proto.x_pb2`, the installed name.
VIRTUAL_DIR = "shardgate/proto"


def generate(out_dir: Path) -> list[Path]:
    """Compiles every .proto into out_dir; returns the generated files."""
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{VIRTUAL_DIR}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(f"{VIRTUAL_DIR}/{name}" for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / VIRTUAL_DIR).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for path in generate(Path(tmp)):
            target = PROTO_DIR / path.name
            if check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(path.name)
            else:
                target.write_bytes(path.read_bytes())
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run python -m shardgate.proto.generate")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
