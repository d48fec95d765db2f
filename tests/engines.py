"""Real OpenAI-compatible serving engines on poi-lm, for tests (issue 27): each context manager
starts the engine as a subprocess on a free localhost port, waits until it answers, yields its
base URL (".../v1", what `openai.OpenAI(base_url=...)` takes) and kills its process group on exit.

Both engines run offline from local files: `transformers serve` from the packaged poi-lm folder,
llama.cpp (llama-cpp-python's server) from a GGUF file made by `registry.gguf_export`. Neither is
a dependency of `dev`: `missing_engine` names what is not installed (the `engines` extra).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# what each engine imports at start-up; transformers serve loads through device_map, which needs accelerate
ENGINE_MODULES = {
    "llama.cpp": ["llama_cpp", "gguf", "sse_starlette", "starlette_context", "pydantic_settings"],
    "transformers serve": ["transformers", "fastapi", "uvicorn", "accelerate"],
}
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",  # the `transformers` CLI otherwise asks PyPI for a newer release
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def missing_engine(engine: str) -> str | None:
    """Why `engine` cannot run here, or None when everything it imports is installed."""
    missing = [m for m in ENGINE_MODULES[engine] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"{engine} needs {', '.join(missing)}: pip install -c constraints.txt -e '.[engines]'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def serve(cmd: list[str], ready_url: str, base_url: str, timeout: float, name: str) -> Iterator[str]:
    """Run `cmd` in its own process group until `ready_url` answers 200; yield `base_url`."""
    env = {**os.environ, **OFFLINE_ENV}
    with tempfile.NamedTemporaryFile("w+b", prefix="engine-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        # a new session, so the kill below reaches the engine's workers too
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} before it was ready: {' '.join(cmd)}\n"
                    f"{_tail(log_path)}"
                )
            try:
                if httpx.get(ready_url, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"{name} did not answer {ready_url} within {timeout:.0f} s: {' '.join(cmd)}\n"
                    f"{_tail(log_path)}"
                )
            time.sleep(0.25)
        yield base_url
    finally:
        _kill_group(proc)
        log_path.unlink(missing_ok=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # workers left in the group after the leader exited
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def llama_cpp_server(
    gguf_path: Path, alias: str = "poi-lm", timeout: float = 120.0, threads: int = 1, kv_f32: bool = True
) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on a GGUF file. `logits_all` is on because its
    completions endpoint refuses `logprobs` without it. llama.cpp keeps its KV cache in f16 by default,
    which alone moves poi-lm's log-probs by ~2e-3 from fp32; `kv_f32` keeps it in f32 (type 0)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_path), "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "1024", "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--logits_all", "true", "--verbose", "false",
    ]  # fmt: skip
    if kv_f32:
        cmd += ["--type_k", "0", "--type_v", "0"]
    base = f"http://127.0.0.1:{port}/v1"
    with serve(cmd, f"{base}/models", base, timeout, "llama.cpp server") as url:
        yield url


@contextlib.contextmanager
def transformers_server(model_dir: Path, timeout: float = 180.0) -> Iterator[str]:
    """`transformers serve` pinned to a local model folder (requests must name that same path as
    their `model`), on the CPU in fp32. It loads the model before it listens, so /health means ready."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with serve(cmd, f"{base}/health", f"{base}/v1", timeout, "transformers serve") as url:
        yield url
