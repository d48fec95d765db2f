"""Real OpenAI-compatible serving engines on poi-lm, for tests (issue 27): each context manager
starts the engine as a subprocess on a free localhost port, waits until it answers, yields its
base URL (".../v1", what `openai.OpenAI(base_url=...)` takes) and kills its process group on exit.

Both engines run offline from local files: `transformers serve` from the packaged poi-lm folder,
llama.cpp (llama-cpp-python's server) from a GGUF file made by `registry.gguf_export`. Neither is
a dependency of `dev`: `missing_engine` names what is not installed (the `engines` extra). The
command lines and the process handling live in `maxwell_poi.prover.engine_process`, which the
engine adapter (`poi agent --engine-cmd`) uses too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from maxwell_poi.prover.engine_process import (
    ENGINE_MODULES,
    OFFLINE_ENV,
    free_port,
    llama_cpp_argv,
    missing_engine,
    serve,
    transformers_serve_argv,
    with_port,
)

__all__ = [
    "ENGINE_MODULES",
    "OFFLINE_ENV",
    "free_port",
    "llama_cpp_server",
    "missing_engine",
    "require_engine",
    "transformers_server",
]


def require_engine(engine: str) -> None:
    """Skip the test when `engine` is not installed, with the reason; under CI=true fail it instead
    (CI installs the `engines` extra, so a missing engine there is a broken install)."""
    reason = missing_engine(engine)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def llama_cpp_server(
    gguf_path: Path, alias: str = "poi-lm", timeout: float = 120.0, threads: int = 1, kv_f32: bool = True
) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on a GGUF file (`engine_process.llama_cpp_argv`)."""
    argv, port = with_port(llama_cpp_argv(gguf_path, alias, threads, kv_f32))
    base = f"http://127.0.0.1:{port}/v1"
    with serve(argv, f"{base}/models", base, timeout) as url:
        yield url


@contextlib.contextmanager
def transformers_server(model_dir: Path, timeout: float = 180.0) -> Iterator[str]:
    """`transformers serve` pinned to a local model folder (requests must name that same path as
    their `model`), on the CPU in fp32. It loads the model before it listens, so /health means ready."""
    argv, port = with_port(transformers_serve_argv(model_dir))
    base = f"http://127.0.0.1:{port}"
    with serve(argv, f"{base}/health", f"{base}/v1", timeout) as url:
        yield url
