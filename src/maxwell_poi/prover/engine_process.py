"""A serving engine as a child process of the engine adapter (issue 27), so it runs in the agent's
sandbox and Maxwell's L1/L2 measure the engine itself.

- `EngineProcess`: start an engine command (llama.cpp's server, `transformers serve`, vLLM, ...)
  in a process group of its own inside the adapter's session (a child that calls setsid would be an
  escape attempt to the node), wait until it answers, stop it with the adapter.
- `private_loopback`: a confined sandbox has a network namespace whose loopback is down, so an
  engine listening on 127.0.0.1 cannot be reached. The adapter then gives itself (before it starts
  any thread or child) a user and network namespace of its own, nested inside the sandbox's, with
  the loopback up: the engine and the adapter share it; nothing outside can reach either.
- `engine_identity`: which engine a command line starts and the installed version (a claim).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.metadata
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from ..protocol.errors import PoiError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",  # the `transformers` CLI otherwise asks PyPI for a newer release
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
# command-line marks of the engines we know -> (name in receipts, distribution for its version)
KNOWN_ENGINES = (
    ("llama_cpp.server", "llama.cpp", "llama_cpp_python"),
    ("llama-server", "llama.cpp", ""),
    ("transformers", "transformers serve", "transformers"),
    ("vllm", "vllm", "vllm"),
    ("sglang", "sglang", "sglang"),
    ("text-generation-launcher", "tgi", ""),
)
# what each engine imports at start-up; transformers serve loads through device_map, which needs accelerate
ENGINE_MODULES = {
    "llama.cpp": ["llama_cpp", "gguf", "sse_starlette", "starlette_context", "pydantic_settings"],
    "transformers serve": ["transformers", "fastapi", "uvicorn", "accelerate"],
}
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PR_SET_PDEATHSIG = 1


class EngineError(PoiError):
    """The engine could not be started or reached; the message says what was tried."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_engine(engine: str) -> str | None:
    """Why `engine` cannot run here, or None when everything it imports is installed."""
    import importlib.util

    missing = [m for m in ENGINE_MODULES[engine] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"{engine} needs {', '.join(missing)}: pip install -c constraints.txt -e '.[engines]'"


def engine_identity(argv: list[str]) -> tuple[str, str]:
    """(engine name, version) for a command line: a claim for the receipt, never evidence."""
    joined = " ".join(argv)
    for mark, name, dist in KNOWN_ENGINES:
        if mark in joined and (name != "transformers serve" or "serve" in argv):
            try:
                version = importlib.metadata.version(dist) if dist else ""
            except importlib.metadata.PackageNotFoundError:
                version = ""
            return name, version
    return "openai-compatible", ""


def loopback_works() -> bool:
    """Whether a connection to 127.0.0.1 can be made here (not in a sandbox with a downed loopback)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        try:
            socket.create_connection(server.getsockname(), timeout=2).close()
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.ECONNREFUSED):
                return False
            raise
    return True


def private_loopback() -> str | None:
    """Give this process (single-threaded: call it first) a user + network namespace of its own with
    the loopback up, when 127.0.0.1 is unreachable here. None when nothing was needed; else what was
    done. Raises EngineError saying what the kernel refused."""
    if loopback_works():
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise EngineError(
            f"the loopback is down here (a confined sandbox) and a private network namespace was "
            f"refused: unshare: {os.strerror(ctypes.get_errno())}; serve the engine elsewhere (--engine URL)"
        )
    try:  # the same ids inside as outside: files keep their owners
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError as exc:
        raise EngineError(f"private network namespace: mapping ids failed: {exc}") from None
    with socket.socket() as s:
        req = struct.pack("16sh14x", b"lo", 0)
        import fcntl

        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))
    if not loopback_works():
        raise EngineError("private network namespace: the loopback is still unreachable after bringing it up")
    return "the sandbox's loopback is down: the adapter and its engine share a private network namespace"


def _die_with_parent() -> None:
    """In the engine child before exec: its own process group (not session), killed with the adapter."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EngineProcess:
    """One engine command run as this process's child (same session, own process group)."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None = None, *, own_session: bool = False
    ) -> None:
        self.argv = argv
        self.log = Path(tempfile.mkstemp(prefix="engine-", suffix=".log")[1])
        full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
        with self.log.open("wb") as log:
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=full_env,
                    # tests outside a sandbox may give it a session; in a sandbox that is an escape
                    start_new_session=own_session,
                    preexec_fn=None if own_session else _die_with_parent,  # noqa: PLW1509
                )
            except OSError as exc:
                raise EngineError(f"engine start failed: {shlex.join(argv)}: {exc.strerror}") from None

    def stderr_tail(self) -> str:
        return _tail(self.log)

    def wait_ready(self, ready_url: str, timeout: float) -> None:
        """Until `ready_url` answers 200; EngineError with the engine's log tail if it exits or stalls."""
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise EngineError(
                    f"engine start failed: exited with {self.proc.returncode} before it answered "
                    f"{ready_url}: {shlex.join(self.argv)}\n{self.stderr_tail()}"
                )
            try:
                if httpx.get(ready_url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                raise EngineError(
                    f"engine not reachable: {ready_url} did not answer within {timeout:.0f} s: "
                    f"{shlex.join(self.argv)}\n{self.stderr_tail()}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers left in the group
            os.killpg(proc.pid, signal.SIGKILL)
        self.log.unlink(missing_ok=True)


def with_port(argv: list[str]) -> tuple[list[str], int]:
    """The command with a port: `{port}` filled in with a free one, or `--host 127.0.0.1 --port N`
    appended when it names none; an explicit `--port N` is kept."""
    if any("{port}" in a for a in argv):
        port = free_port()
        return [a.replace("{port}", str(port)) for a in argv], port
    for i, a in enumerate(argv):
        if a == "--port" and i + 1 < len(argv):
            return argv, int(argv[i + 1])
        if a.startswith("--port="):
            return argv, int(a.split("=", 1)[1])
    port = free_port()
    return [*argv, "--host", "127.0.0.1", "--port", str(port)], port


@contextlib.contextmanager
def serve(
    argv: list[str], ready_url: str, base_url: str, timeout: float, *, own_session: bool = True
) -> Iterator[str]:
    """Run `argv` until `ready_url` answers 200; yield `base_url`; stop it after."""
    engine = EngineProcess(argv, own_session=own_session)
    try:
        engine.wait_ready(ready_url, timeout)
        yield base_url
    finally:
        engine.stop()


def llama_cpp_argv(
    gguf_path: Path | str, alias: str = "poi-lm", threads: int = 1, kv_f32: bool = True
) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on a GGUF file (no port: `with_port` adds it).
    `logits_all` is on because its completions endpoint refuses `logprobs` without it; the KV cache
    is f32 (type 0) because its f16 default alone moves poi-lm's log-probs by ~2e-3 from fp32.
    `interrupt_requests` is off: by default the server ends a streaming completion early when another
    request arrives, so the work probe's request (prover.engine) would cut the lease it probes short."""
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", alias,
        "--n_ctx", "1024", "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--logits_all", "true", "--interrupt_requests", "false", "--verbose", "false",
    ]  # fmt: skip
    return argv + (["--type_k", "0", "--type_v", "0"] if kv_f32 else [])


def transformers_serve_argv(model_dir: Path | str) -> list[str]:
    """`transformers serve` pinned to a local model folder, on the CPU in fp32 (no port)."""
    return [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
        "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
    ]  # fmt: skip


def ready_path(argv: list[str]) -> str:
    """Where an engine answers once its model is loaded: /health for `transformers serve` (it loads
    before listening), /v1/models otherwise."""
    return "/health" if engine_identity(argv)[0] == "transformers serve" else "/v1/models"
