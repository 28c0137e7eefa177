"""Every proto compiles and its generated modules import (under the pinned grpcio/protobuf)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tandem import protogen

PROTOS = sorted(p.stem for p in (protogen.PROTO_DIR / "tandem" / "v1").glob("*.proto"))


def test_all_protos_listed() -> None:
    assert set(PROTOS) >= {"common", "styler", "worker", "inference"}


def test_protos_compile(tmp_path: Path) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p) for p in protogen.proto_files()]
    args = [
        "protoc",
        f"-I{protogen.PROTO_DIR}",
        f"-I{include}",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *files,
    ]
    assert protoc.main(args) == 0
    for name in PROTOS:
        assert (tmp_path / "tandem" / "v1" / f"{name}_pb2.py").exists()


@pytest.mark.parametrize("name", PROTOS)
def test_generated_module_imports(name: str) -> None:
    protogen.ensure_generated()
    module = importlib.import_module(f"tandem.v1.{name}_pb2")
    assert module.DESCRIPTOR.package == "tandem.v1"
    importlib.import_module(f"tandem.v1.{name}_pb2_grpc")


@pytest.mark.parametrize("name", PROTOS)
def test_every_rpc_and_field_is_commented(name: str) -> None:
    """DESIGN.md: every rpc and field carries a // comment (on the line(s) above it)."""
    lines = (protogen.PROTO_DIR / "tandem" / "v1" / f"{name}.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_rpc = stripped.startswith("rpc ")
        is_field = (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("//", "option", "syntax"))
        )
        if is_rpc or is_field:
            assert lines[i - 1].strip().startswith("//"), f"{name}.proto:{i + 1} has no comment: {stripped}"


VENDORED = [
    p.parent.relative_to(protogen.PROTO_DIR).as_posix() + "/" + p.stem
    for p in protogen.vendored_proto_files()
]


@pytest.mark.parametrize("folder", ["openengine", "tandem/smg"])
def test_vendored_protos_carry_their_license(folder: str) -> None:
    assert "Apache License" in (protogen.PROTO_DIR / folder / "LICENSE").read_text()
    assert (protogen.PROTO_DIR / folder / "SOURCE").is_file(), "where they came from, and what changed"


def test_ext_proc_protos_carry_their_licenses() -> None:
    """Envoy's ext-proc protos (the Endpoint Picker's) come from three repositories, each licensed."""
    tree = protogen.PROTO_DIR / "tandem" / "ext_proc"
    for name in ("envoy", "xds", "protoc-gen-validate"):
        assert "Apache License" in (tree / f"LICENSE.{name}").read_text()
    source = (tree / "SOURCE").read_text()
    assert "envoyproxy/data-plane-api" in source and "cncf/xds" in source and "protoc-gen-validate" in source
    # Imports name their vendored path, so the generated code stays inside tandem.ext_proc.
    for proto in tree.rglob("*.proto"):
        for line in proto.read_text().splitlines():
            if line.startswith("import "):
                assert '"google/protobuf/' in line or '"tandem/ext_proc/' in line, f"{proto}: {line}"


@pytest.mark.parametrize("path", VENDORED)
def test_vendored_module_imports(path: str) -> None:
    """The vendored protocols generate importable modules under the pinned grpcio/protobuf."""
    protogen.ensure_generated()
    module = importlib.import_module(path.replace("/", ".") + "_pb2")
    package = module.DESCRIPTOR.package
    assert package in ("openengine.v1", "vllm.grpc.engine", "smg.grpc.common") or (
        path.startswith("tandem/ext_proc/") and package.split(".")[0] in ("envoy", "xds", "udpa", "validate")
    )
    importlib.import_module(path.replace("/", ".") + "_pb2_grpc")
