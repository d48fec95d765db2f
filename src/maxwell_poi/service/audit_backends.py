"""Where queued audits run: threads of the control plane, a local process pool, or Ray actors.

An audit job is plain data: the lease JSON, the receipt bytes, the node's evidence as a dict
(opened and its node signature checked by the control plane already), when the receipt came in,
and the agent's public key. So a worker needs neither the database nor the control plane's live
keyring: it builds a one-agent keyring and appraises L0 + L4 with its own reference models, loaded
once per worker and kept. It answers the AttestationResult as a dict; the control plane
(service.audits) finalises the verdict and the stake in its database, whichever backend ran it.

    thread   threads of the control plane's process, sharing its registry (the old behaviour)
    process  `audit_workers` spawned local processes (the default)
    ray      `audit_workers` Ray actors, on a local Ray or a cluster (`--ray-address`; extra [ray])
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..observer.evidence import LeaseEvidence
from ..protocol.keys import Keyring
from ..protocol.lease import Lease
from ..registry.models import Registry
from ..verifier.audit import AuditLayer
from ..verifier.policy import Verifier
from .config import AUDIT_BACKENDS

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'maxwell-poi[ray]'"


@dataclass(frozen=True)
class AuditJob:
    """One queued audit as plain, picklable data."""

    lease_json: str
    receipt: bytes
    evidence: dict[str, Any] | None  # LeaseEvidence.as_dict(); None = no Maxwell-side evidence
    received_at: float
    agent_public_key: str  # hex; "" = the agent is not enrolled, and L0 refuses the receipt

    @classmethod
    def of(
        cls,
        lease: Lease,
        receipt: bytes,
        evidence: LeaseEvidence | None,
        received_at: float,
        agent_public_key: str,
    ) -> AuditJob:
        opened = None if evidence is None else evidence.as_dict()
        return cls(lease.to_json(), receipt, opened, received_at, agent_public_key)


class AuditFailed(RuntimeError):
    """An audit that raised inside a worker, carried back as text: a worker's own exception types
    need not survive pickling, and a process pool that cannot unpickle one breaks for good."""


class BackendUnavailable(ValueError):
    """The configured backend cannot run here (Ray not installed, or no Ray to reach)."""


def audit_verifier(registry: Registry, keyring: Keyring, layer: AuditLayer | None = None) -> Verifier:
    """The audit stack: L0 (replay is the database's to refuse) gating L4, drawn at rate 1."""
    return Verifier.audit_only(registry, keyring, layer)


class AuditRunner:
    """One worker's verifier: its registry and audit layer keep the reference models loaded."""

    def __init__(self, registry: Registry | None = None, *, preload: Sequence[str] = ()) -> None:
        self.registry = registry or Registry()
        self.layer = AuditLayer(self.registry)
        for model_id in preload:  # benchmarks: model building stays out of the timed audits
            self.layer.reference_model(model_id)

    def run(self, job: AuditJob) -> dict[str, Any]:
        """The AttestationResult of L0 + L4 on `job`, as a dict (AttestationResult.from_dict)."""
        try:
            lease = Lease.from_json(job.lease_json)
            keys = {lease.agent_id: job.agent_public_key} if job.agent_public_key else {}
            evidence = None if job.evidence is None else LeaseEvidence.from_dict(job.evidence)
            verifier = audit_verifier(self.registry, Keyring(keys), self.layer)
            result = verifier.appraise(lease, job.receipt, evidence, received_at=job.received_at)
        except Exception as exc:
            where = traceback.format_exc()
            raise AuditFailed(f"{type(exc).__name__}: {exc}\nin the audit worker:\n{where}") from exc
        return result.as_dict()


class AuditBackend(Protocol):
    name: str
    workers: int

    def submit(self, job: AuditJob) -> Future[dict[str, Any]]:
        """Queue one audit; the future holds AttestationResult.as_dict() or raises AuditFailed."""
        ...

    def warm(self, timeout_s: float = 300.0) -> None:
        """Block until every worker has built its verifier (benchmarks time audits, not starts)."""
        ...

    def close(self) -> None: ...


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker: the cores shared out, so workers do not fight over them."""
    return max(1, (cores or usable_cores()) // max(1, workers))


class ThreadBackend:
    """In the control plane's process: its registry (models built once for both), its torch pool."""

    name = "thread"

    def __init__(
        self, workers: int, registry: Registry | None = None, *, preload: Sequence[str] = ()
    ) -> None:
        self.workers = workers
        self.runner = AuditRunner(registry, preload=preload)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="poi-audit-run")

    def submit(self, job: AuditJob) -> Future[dict[str, Any]]:
        return self._pool.submit(self.runner.run, job)

    def warm(self, timeout_s: float = 300.0) -> None:
        return None  # the runner was built (and its `preload` loaded) in the constructor

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_worker_runner: AuditRunner | None = None  # in a pool process: built once by its initializer


def _start_worker(threads: int, user_file: str | None, preload: tuple[str, ...]) -> None:
    global _worker_runner
    import torch

    torch.set_num_threads(threads)
    registry = Registry(Path(user_file)) if user_file else Registry()
    _worker_runner = AuditRunner(registry, preload=preload)


def _start_pool_process(parent: int, threads: int, user_file: str | None, preload: tuple[str, ...]) -> None:
    _exit_with_parent(parent)
    _start_worker(threads, user_file, preload)


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """A pool process outlives a SIGKILLed control plane (it waits on a pipe it holds both ends
    of), keeping a model in memory for good: it leaves once `parent` is gone. The pid comes from
    the parent itself: one killed while this process was still starting is gone already."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="poi-audit-parent-watch", daemon=True).start()


def _run_in_worker(job: AuditJob) -> dict[str, Any]:
    if _worker_runner is None:
        raise AuditFailed("the pool process has no verifier: its initializer did not run")
    return _worker_runner.run(job)


def _worker_pid() -> int:
    time.sleep(0.05)  # long enough that one process cannot answer every probe of a round
    return os.getpid()


class ProcessBackend:
    """A local pool of spawned processes (not forked: torch's threads do not survive a fork), each
    with its own verifier built once by the pool's initializer."""

    name = "process"

    def __init__(
        self,
        workers: int,
        *,
        registry_file: Path | None = None,
        preload: Sequence[str] = (),
        threads: int | None = None,
    ) -> None:
        self.workers = workers
        self.threads = threads or threads_per_worker(workers)
        self._initargs = (self.threads, str(registry_file) if registry_file else None, tuple(preload))
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_pool_process,
            initargs=(os.getpid(), *self._initargs),
        )

    def submit(self, job: AuditJob) -> Future[dict[str, Any]]:
        with self._lock:
            try:
                return self._pool.submit(_run_in_worker, job)
            except BrokenProcessPool as exc:  # a worker died (killed, out of memory): start afresh
                log.warning("audit process pool broken (%s); starting a new one", exc)
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                return self._pool.submit(_run_in_worker, job)

    def warm(self, timeout_s: float = 300.0) -> None:
        """Probe until every process has answered: each answers only after its initializer ran."""
        deadline, seen = time.monotonic() + timeout_s, set()
        while len(seen) < self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {self.workers} warm audit processes, got {len(seen)}")
            with self._lock:
                probes = [self._pool.submit(_worker_pid) for _ in range(self.workers)]
            seen.update(p.result(timeout=timeout_s) for p in probes)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(
            f"audit backend 'ray': expected the ray package ({RAY_INSTALL}), got {type(exc).__name__}: {exc}"
        ) from None
    return ray


def refuse_unreachable(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` (or `ray://host:port`) nobody answers on is refused now: Ray itself retries
    a dead address for many minutes before it says so. Other forms ("auto") are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise BackendUnavailable(
            f"audit backend 'ray': expected a Ray cluster answering at {address}, "
            f"got {type(exc).__name__}: {exc}"
        ) from None


class _RayWorker:
    """A Ray actor's body: one AuditRunner for the actor's life."""

    def __init__(self, threads: int, user_file: str | None, preload: tuple[str, ...]) -> None:
        _start_worker(threads, user_file, preload)

    def run(self, job: AuditJob) -> dict[str, Any]:
        return _run_in_worker(job)

    def ready(self) -> bool:
        return True


class RayBackend:
    """`workers` Ray actors, each holding its verifier; a job goes to an idle actor, else waits.

    Local (no address): a Ray instance of this machine's cores, its actors sharing them out like
    the process pool's workers. On a cluster, each actor reserves one CPU and sees its own node's
    registry (the built-in models; `poi model add` them there too)."""

    name = "ray"

    def __init__(
        self,
        workers: int,
        address: str = "",
        *,
        registry_file: Path | None = None,
        preload: Sequence[str] = (),
        threads: int | None = None,
    ) -> None:
        ray = import_ray()
        self.workers, self._ray = workers, ray
        local = not address
        cores = usable_cores()
        self.threads = threads or (threads_per_worker(workers, cores) if local else 1)
        self._owns_ray = not ray.is_initialized()
        if address and self._owns_ray:
            refuse_unreachable(address)
        try:
            ray.init(
                address=address or None,
                num_cpus=cores if local else None,
                include_dashboard=False,
                ignore_reinit_error=True,
            )
        except Exception as exc:
            where = f"the Ray cluster at {address}" if address else "a new local Ray instance"
            raise BackendUnavailable(
                f"audit backend 'ray': expected {where}, got {type(exc).__name__}: {exc}"
            ) from None
        actor = ray.remote(num_cpus=self.threads if local else 1, max_restarts=-1)(_RayWorker)
        user_file = str(registry_file) if registry_file and local else None
        self._actors = [actor.remote(self.threads, user_file, tuple(preload)) for _ in range(workers)]
        self._idle = deque(self._actors)
        self._waiting: deque[tuple[AuditJob, Future[dict[str, Any]]]] = deque()
        self._lock = threading.Lock()

    def submit(self, job: AuditJob) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._waiting.append((job, future))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        with self._lock:
            pairs = []
            while self._idle and self._waiting:
                pairs.append((self._idle.popleft(), *self._waiting.popleft()))
        for actor, job, future in pairs:
            if not future.set_running_or_notify_cancel():  # cancelled while it waited
                self._finished(actor)
                continue
            ref = actor.run.remote(job)
            ref.future().add_done_callback(lambda done, a=actor, f=future: self._answer(a, f, done))

    def _answer(self, actor: Any, future: Future[dict[str, Any]], done: Future[Any]) -> None:
        exc = done.exception()
        if exc is None:
            future.set_result(done.result())
        else:  # RayTaskError(AuditFailed) is an AuditFailed; a dead actor is restarted by Ray
            future.set_exception(exc)
        self._finished(actor)

    def _finished(self, actor: Any) -> None:
        with self._lock:
            self._idle.append(actor)
        self._dispatch()

    def warm(self, timeout_s: float = 300.0) -> None:
        self._ray.get([a.ready.remote() for a in self._actors], timeout=timeout_s)

    def close(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for _job, future in waiting:
            future.cancel()
        for actor in self._actors:
            self._ray.kill(actor)
        if self._owns_ray:  # a Ray this backend started; one started by its caller stays up
            self._ray.shutdown()


def open_backend(
    kind: str,
    workers: int,
    *,
    registry: Registry | None = None,
    ray_address: str = "",
    preload: Sequence[str] = (),
) -> AuditBackend:
    """The audit backend named `kind` (one of AUDIT_BACKENDS) with `workers` workers. `registry`: the
    control plane's (threads share it; processes and local Ray actors read the same model file)."""
    user_file = registry.user_file if registry else None
    if kind == "thread":
        return ThreadBackend(workers, registry, preload=preload)
    if kind == "process":
        return ProcessBackend(workers, registry_file=user_file, preload=preload)
    if kind == "ray":
        return RayBackend(workers, ray_address, registry_file=user_file, preload=preload)
    raise ValueError(f"audit_backend: expected one of {', '.join(AUDIT_BACKENDS)}, got {kind!r}")


__all__ = [
    "AUDIT_BACKENDS",
    "AuditBackend",
    "AuditFailed",
    "AuditJob",
    "AuditRunner",
    "BackendUnavailable",
    "ProcessBackend",
    "RayBackend",
    "ThreadBackend",
    "audit_verifier",
    "open_backend",
    "threads_per_worker",
    "usable_cores",
]
