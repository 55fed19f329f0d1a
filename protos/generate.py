"""Regenerate the Python code for every .proto file here: `python -m tokenpool.protos.generate`.

protoc sees this folder as tokenpool/protos/ (a virtual path), so the generated
modules import each other as tokenpool.protos.* and live beside their .proto files.
tests/test_protos.py fails when the committed code is stale.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIRTUAL = "tokenpool/protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(HERE.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every .proto under out_dir (mirroring this folder)."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{VIRTUAL}={HERE}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [f"{VIRTUAL}/{p.relative_to(HERE)}" for p in proto_files()]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(tmp) / VIRTUAL).rglob("*")):
            if src.name.endswith(SUFFIXES):
                dest = out_dir / src.relative_to(Path(tmp) / VIRTUAL)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
                written.append(dest)
        return written


def main() -> int:
    for path in generate(HERE):
        print(path.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
