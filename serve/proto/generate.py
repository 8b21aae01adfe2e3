"""Regenerate open_inference_pb2.py from open_inference.proto (grpcio-tools, requirements-dev.txt).

    python -m serve.proto.generate            # writes serve/proto/open_inference_pb2.py
    python -m serve.proto.generate --check    # exits 1 if the committed file differs from a fresh one

The generated file is committed so the server image needs no protoc; tests/test_grpc.py checks it is current.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("serve/proto/open_inference.proto")
GENERATED = ROOT / "serve/proto/open_inference_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc on the .proto into out_dir (relative to the repository root, so the module is
    serve.proto.open_inference_pb2); return the generated file's path."""
    from grpc_tools import protoc

    code = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={out_dir}", str(ROOT / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
    return out_dir / PROTO.with_name("open_inference_pb2.py")


def fresh_text() -> str:
    with tempfile.TemporaryDirectory() as folder:
        return generate(Path(folder)).read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    args = parser.parse_args(argv)
    text = fresh_text()
    if args.check:
        if GENERATED.read_text() != text:
            print(f"{GENERATED.relative_to(ROOT)} is stale: run python -m serve.proto.generate", file=sys.stderr)
            return 1
        return 0
    GENERATED.write_text(text)
    print(f"wrote {GENERATED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
