"""Generate the Python gRPC modules `tandem.v1.*_pb2` from `protos/tandem/v1/*.proto`, and the
vendored industry protocols the worker also serves (`openengine.v1.*_pb2` from
`protos/openengine/v1/`, unmodified upstream files: their imports fix the package name), and the
Envoy ext-proc protos the Endpoint Picker serves (`protos/tandem/ext_proc/`, a tree of upstream
files whose imports carry that prefix, generated as `tandem.ext_proc.*`).

Run as `python -m tandem.protogen` (the set-up script and the container build do). The generated
code targets grpcio 1.84 / protobuf >= 7.35, the versions pinned in pyproject.toml and present on
the GPU machines. `ensure_generated()` regenerates when a .proto is newer than its module, so a
checkout whose protos changed never imports stale code.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_PACKAGE = ROOT / "tandem" / "v1"
# Vendored protocol packages: each generates a git-ignored top-level package at its proto path.
VENDORED = ("openengine/v1", "tandem/smg")
# Vendored proto trees (every .proto below, at any depth), each generating a git-ignored package tree.
VENDORED_TREES = ("tandem/ext_proc",)


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "tandem" / "v1").glob("*.proto"))


def vendored_proto_files() -> list[Path]:
    flat = [p for sub in VENDORED for p in sorted((PROTO_DIR / sub).glob("*.proto"))]
    return flat + [p for tree in VENDORED_TREES for p in sorted((PROTO_DIR / tree).rglob("*.proto"))]


def _module(proto: Path) -> Path:
    return ROOT / proto.parent.relative_to(PROTO_DIR) / f"{proto.stem}_pb2.py"


def is_stale() -> bool:
    for proto in proto_files() + vendored_proto_files():
        module = _module(proto)
        if not module.exists() or module.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def generate() -> None:
    from grpc_tools import protoc  # imported here: only set-up needs grpcio-tools

    OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
    (OUT_PACKAGE / "__init__.py").write_text('"""Generated from protos/tandem/v1 by tandem.protogen."""\n')
    trees = {
        str(p.parent.relative_to(PROTO_DIR))
        for tree in VENDORED_TREES
        for p in (PROTO_DIR / tree).rglob("*.proto")
    }
    for sub in [*VENDORED, *sorted(trees)]:  # the package and its parents (`openengine`, `openengine/v1`)
        parts = Path(sub).parts
        for i in range(1, len(parts) + 1):
            package = ROOT.joinpath(*parts[:i])
            package.mkdir(parents=True, exist_ok=True)
            init = package / "__init__.py"
            if not init.exists():  # never over a real package's (tandem/__init__.py)
                init.write_text(f'"""Generated from protos/{sub} by tandem.protogen."""\n')
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[str(p) for p in proto_files() + vendored_proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR}")


def ensure_generated() -> None:
    """Generate the modules when missing or older than their .proto files."""
    if is_stale():
        generate()


def main() -> int:
    generate()
    print(f"generated {len(proto_files())} protos into {OUT_PACKAGE.relative_to(ROOT)}")
    print(
        f"generated {len(vendored_proto_files())} vendored protos into {', '.join(VENDORED + VENDORED_TREES)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
