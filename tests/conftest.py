"""Shared test fixtures: where the shared data lives, and a clean offline environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TANDEM_SHARED", REPO_ROOT.parent / "shared")).resolve()
STORIES_DIR = SHARED / "models" / "stories260K"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run on its CPU interpreter without a GPU. TRITON_INTERPRET is read when triton is
# first imported and a `@triton.jit` function defined, so it is set here, before any test module
# is collected: a module collected before tests/kernels that imports triton (transformers does)
# left helpers compiled for a GPU and the kernel tests failed ("Cannot call @triton.jit'd outside
# of the scope of a kernel"). Workers on the CPU pick the reference kernels either way.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_triton_language_once_per_launch() -> None:
    """Triton's CPU interpreter (3.6) patches triton.language (`_patch_lang`: every builtin of
    `tl`, `tl.core`, `tl.math` and tensor) once when a kernel launches, undoing it when the launch
    ends, and again on every call of a `@triton.jit` helper inside the kernel, in every program of
    the grid, never undoing those. Within a launch, a helper's patch of the modules the launch (or
    an earlier helper) already patched sets the same functions again: here it is made once per
    launch and set of modules, the rest skipped. The kernels run as before; the interpreter spent
    most of some tests' time re-patching (beam selection kernels: tens of thousands of calls)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if triton.__version__ != "3.6.0":  # (the version pinned in pyproject.toml; another may differ)
        return
    import threading

    patch_lang = interpreter._patch_lang
    launch_call = interpreter.GridExecutor.__call__
    state = threading.local()

    def patch_once(fn: Any) -> Any:
        done = getattr(state, "done", None)
        if done is None:  # outside a launch: as Triton does
            return patch_lang(fn)
        langs = frozenset(
            id(v) for v in fn.__globals__.values() if v is triton.language or v is triton.language.core
        )
        if langs in done:  # a helper's call: these modules are patched for this launch
            return interpreter._LangPatchScope()
        done.add(langs)
        return patch_lang(fn)

    def launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer = getattr(state, "done", None)
        state.done = set()
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            state.done = outer

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch


_patch_triton_language_once_per_launch()

# Property tests draw the same examples on every run: a failure is a bug that reproduces, not a
# flake that comes and goes with the random seed (a test's own `@settings` only adds to this).
# `--hypothesis-profile explore` draws new examples each run, to look for bugs on purpose (with
# `--hypothesis-seed N` it replays one such run).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set TANDEM_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def stories_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "stories260K"


@pytest.fixture(scope="session")
def tiny_qwen3_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 with the real Qwen3 tokenizer and chat template, saved once."""
    from tests.gateway.tiny_qwen3 import write_tiny_qwen3

    return write_tiny_qwen3(shared_dir, tmp_path_factory.mktemp("tiny-qwen3"))


# The longest folders are handed out first, longest first (parallel: its tensor-parallel groups
# each start several processes; then worker and kernels, the largest in-process folders), so the
# short folders fill the end and the two processes finish close together.
_FIRST_FOLDERS = ("parallel", "worker", "kernels")


def _folder(nodeid: str) -> str:
    return nodeid.split("/", 2)[1]  # tests/<folder>/...


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`scripts/test.sh` runs the whole suite on two pytest processes (pytest-xdist, `--dist
    loadscope`) with a test folder as the scope: a folder runs whole on one process, in its usual
    order, so its session fixtures (stacks, tiny models) are built once and its tests that rely on
    the ones before them still follow them."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _folder(nodeid)

    return FolderScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the order folders are handed out
        rank = {folder: i for i, folder in enumerate(_FIRST_FOLDERS)}
        items.sort(key=lambda item: rank.get(_folder(item.nodeid), len(rank)))  # stable


def pytest_addoption(parser: pytest.Parser) -> None:
    # tests/protocols: run the conformance suite against another engine instead of a tandem worker
    parser.addoption(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="tests/protocols: the engine to drive (default: start a tandem worker on stories260K)",
    )
