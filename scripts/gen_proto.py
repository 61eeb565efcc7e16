"""Generate the Python protobuf and gRPC code from `protos/`.

The code is generated once into a scratch directory and copied into both the
server package and the client package, with `protoc`'s absolute
`from authpool.v1 import ...` rewritten to relative imports so that each copy
is self-contained. Both copies register the same descriptor bytes under the
same file name, which protobuf accepts when a process imports both.

Usage:
    python scripts/gen_proto.py          # write the generated files
    python scripts/gen_proto.py --check  # exit 1 when they are stale
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGETS = (
    ROOT / "authpool_server" / "api",
    ROOT / "clients" / "python" / "authpool_client" / "api",
)
# The mypy-protobuf plugins are installed beside the interpreter running us.
_BIN = Path(sys.executable).parent
_ABSOLUTE_IMPORT = re.compile(r"^from authpool\.v1 import (\w+)", re.MULTILINE)
_DOTTED_IMPORT = re.compile(r"^import authpool\.v1\.(\w+)$", re.MULTILINE)
_DOTTED_USE = re.compile(r"\bauthpool\.v1\.(\w+_pb2)\b")


def generate(out: Path) -> dict[str, str]:
    """Run protoc and return the generated files by name, imports rewritten."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={_BIN / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={_BIN / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--mypy_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_grpc_out={out}",
            *protos,
        ],
        check=True,
    )
    files: dict[str, str] = {}
    for path in sorted((out / "authpool" / "v1").iterdir()):
        text = path.read_text()
        text = _ABSOLUTE_IMPORT.sub(r"from . import \1", text)
        text = _DOTTED_IMPORT.sub(r"from . import \1", text)
        text = _DOTTED_USE.sub(r"\1", text)
        files[path.name] = text
    files["__init__.py"] = '"""Generated from protos/authpool/v1 by `make proto`; do not edit."""\n'
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        files = generate(Path(scratch))
    stale = []
    for target in TARGETS:
        expected = set(files)
        present = {p.name for p in target.glob("*") if p.is_file()} if target.exists() else set()
        for name, text in files.items():
            path = target / name
            if not path.exists() or path.read_text() != text:
                stale.append(path)
                if not args.check:
                    target.mkdir(parents=True, exist_ok=True)
                    path.write_text(text)
        for name in present - expected:
            stale.append(target / name)
            if not args.check:
                (target / name).unlink()
    if args.check and stale:
        for path in stale:
            print(f"stale generated file: {path.relative_to(ROOT)} (run `make proto`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
