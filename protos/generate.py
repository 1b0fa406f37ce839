"""Regenerate the committed Python stubs from ``splitwave.proto``: ``python -m splitwave.protos.generate``.

The stubs are committed so that edge devices need neither grpcio-tools nor a build step. protoc emits
``import splitwave_pb2`` in the grpc module, which only works with ``protos/`` itself on sys.path; we
rewrite it to ``from splitwave.protos import splitwave_pb2`` so the package works installed as ``splitwave.protos``. A test regenerates into a temporary folder and fails when the committed files are stale.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "splitwave.proto"
GENERATED = ("splitwave_pb2.py", "splitwave_pb2_grpc.py", "splitwave_pb2.pyi")

log = logging.getLogger(__name__)

_IMPORT_RE = re.compile(r"^import splitwave_pb2 as (\w+)$", re.MULTILINE)


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc (from grpc_tools) into ``out_dir`` and fix the grpc module's import; returns the files."""
    import importlib.resources

    from grpc_tools import protoc  # only needed here; not a runtime dependency of protos/

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_NAME),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    grpc_file = out_dir / "splitwave_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed, n = _IMPORT_RE.subn(r"from splitwave.protos import splitwave_pb2 as \1", text)
    if n != 1:
        raise RuntimeError(f"expected one 'import splitwave_pb2' line in {grpc_file}, found {n}")
    grpc_file.write_text(fixed)
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder (default: protos/)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(ns.out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
