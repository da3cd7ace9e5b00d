"""Regenerate the committed Python stubs from protos/clusterd.proto.

Usage: python protos/generate.py [OUT_DIR]   (default: the repository root)

The proto is mapped to clusterd/wire/ so the generated modules import each
other as `clusterd.wire.clusterd_pb2`, not as a top-level module.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-Iclusterd/wire={ROOT / 'protos'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "clusterd/wire/clusterd.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
