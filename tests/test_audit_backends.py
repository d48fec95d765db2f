"""Audit backends (service.audit_backends) on REAL gpt2-micro receipts made by the prover SDK: each
backend (threads, a spawned process pool, Ray actors on a local Ray of this host's cores) affirms
an honest receipt with an L4 pass, contraindicates a receipt whose output was changed before
signing by L4, answers exactly what the in-process runner answers, and carries a worker's crash
back as AuditFailed without losing the worker. Ray: skipped when it cannot run here, failed on CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from maxwell_poi.adversaries.output_tampering import tamper
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import sign_receipt, token_output
from maxwell_poi.protocol.result import AttestationResult, LayerName, Status, Verdict
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.service import ServiceConfig
from maxwell_poi.service.audit_backends import (
    AuditBackend,
    AuditFailed,
    AuditJob,
    AuditRunner,
    BackendUnavailable,
    import_ray,
    open_backend,
    refuse_unreachable,
)

MODEL = "gpt2-micro"
TIMEOUT_S = 120.0
ON_CI = os.environ.get("CI", "").lower() == "true"


def _evidence(receipt: bytes, started: float) -> LeaseEvidence:
    """What a node on this host would have measured (the audit reads the device class, L0 the
    receipt size and the finish time): the job carries it to the worker as a dict."""
    now = time.time()
    return LeaseEvidence(
        started_at=started,
        finished_at=now,
        wall_s=now - started,
        cpu_s=now - started,
        max_rss_kb=0,
        bytes_in=0,
        bytes_out=len(receipt),
        sha256_in="",
        sha256_out="",
        exit_code=0,
        receipt_bytes=len(receipt),
        device_class=this_device(),
    )


def _job(key: AgentKey, prompt: str, tampered: bool = False) -> AuditJob:
    prover = Prover(key)
    lease = Lease.issue("alice", MODEL, GenerateJob(prompt=prompt, max_new_tokens=16))
    started = time.time()
    claims = prover.claims(lease)
    if tampered:  # one output token changed, then signed by the leased agent: only L4 can tell
        tokens, vocab = claims.tokens(), prover.registry.reference(MODEL).vocab
        claims = claims.model_copy(update={"output": token_output(tamper(tokens, [8], vocab), vocab)})
    receipt = sign_receipt(claims, key)
    return AuditJob.of(lease, receipt, _evidence(receipt, started), time.time(), key.public_hex)


@pytest.fixture(scope="module")
def jobs() -> dict[str, AuditJob]:
    key = AgentKey.generate()
    return {
        "honest": _job(key, "The history of the steam engine"),
        "tampered": _job(key, "Once upon a time", tampered=True),
    }


@pytest.fixture(scope="module")
def expected(jobs: dict[str, AuditJob]) -> dict[str, dict[str, Any]]:
    """The in-process runner's answers: every backend must give these."""
    runner = AuditRunner()
    return {name: runner.run(job) for name, job in jobs.items()}


def _open(kind: str) -> AuditBackend:
    if kind != "ray":
        return open_backend(kind, 1)
    try:
        import_ray()
        return open_backend("ray", 1)  # a local Ray with this host's cores (ray.init num_cpus)
    except BackendUnavailable as exc:
        if ON_CI:
            pytest.fail(f"CI=true and the Ray backend cannot run: {exc}")
        pytest.skip(f"the Ray backend cannot run here: {exc}")


@pytest.fixture(scope="module", params=["thread", "process", "ray"])
def backend(request: pytest.FixtureRequest) -> Iterator[AuditBackend]:
    opened = _open(request.param)
    try:
        yield opened
    finally:
        opened.close()  # the Ray backend shuts down the Ray it started


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind() -> Iterator[None]:
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _audit(backend: AuditBackend, job: AuditJob) -> AttestationResult:
    return AttestationResult.from_dict(backend.submit(job).result(timeout=TIMEOUT_S))


def test_honest_receipt_is_affirmed_by_the_audit(backend: AuditBackend, jobs: dict[str, AuditJob]) -> None:
    result = _audit(backend, jobs["honest"])
    assert result.verdict is Verdict.AFFIRMING, result.reason
    audit = result.layer(LayerName.AUDIT)
    assert audit.status is Status.PASS, audit.reason
    assert "16 tokens match the seeded choice" in audit.reason
    # the node's evidence reached the worker: it names this host's device class, so same-class tolerance
    assert audit.details["tolerance"] == "same-class", audit.details


def test_tampered_receipt_is_contraindicated_by_the_audit(
    backend: AuditBackend, jobs: dict[str, AuditJob]
) -> None:
    result = _audit(backend, jobs["tampered"])
    assert result.verdict is Verdict.CONTRAINDICATED
    assert result.caught_by == [LayerName.AUDIT], result.reason  # signed and bound: L0 passed it
    assert "token choice" in result.layer(LayerName.AUDIT).reason


def test_answers_are_the_in_process_runners(
    backend: AuditBackend, jobs: dict[str, AuditJob], expected: dict[str, dict[str, Any]]
) -> None:
    def without_timings(d: dict[str, Any]) -> dict[str, Any]:
        layers = [{k: v for k, v in layer.items() if k != "cost_s"} for layer in d["layers"]]
        return {**{k: v for k, v in d.items() if k != "cost_s"}, "layers": layers}

    for name, job in jobs.items():
        got = backend.submit(job).result(timeout=TIMEOUT_S)
        assert without_timings(got) == without_timings(expected[name]), name


def test_a_job_signed_by_an_unknown_agent_is_refused_by_integrity(
    backend: AuditBackend, jobs: dict[str, AuditJob]
) -> None:
    """The worker's keyring holds the job's one agent key: another key's receipt fails L0."""
    stranger = AgentKey.generate().public_hex
    job = AuditJob(**{**jobs["honest"].__dict__, "agent_public_key": stranger})
    result = _audit(backend, job)
    assert result.caught_by == [LayerName.INTEGRITY]
    assert "signature: expected a valid signature by 'alice'" in result.reason
    assert result.layer(LayerName.AUDIT).status is Status.SKIPPED


def test_a_crashing_job_raises_audit_failed_and_the_worker_goes_on(
    backend: AuditBackend, jobs: dict[str, AuditJob]
) -> None:
    broken = AuditJob(**{**jobs["honest"].__dict__, "lease_json": "{not a lease"})
    with pytest.raises(AuditFailed, match="LeaseFormatError"):
        backend.submit(broken).result(timeout=TIMEOUT_S)
    assert _audit(backend, jobs["honest"]).verdict is Verdict.AFFIRMING


def test_service_config_names_the_backends() -> None:
    assert ServiceConfig().audit_backend == "process"
    with pytest.raises(ValueError, match=r"audit_backend: expected one of thread, process, ray, got 'gpu'"):
        ServiceConfig(audit_backend="gpu").validate()
    with pytest.raises(ValueError, match="ray_address: expected only with audit_backend 'ray'"):
        ServiceConfig(ray_address="10.0.0.1:6379").validate()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_SERVE_AUDIT_BACKEND", "thread")
        assert ServiceConfig.from_env(audit_workers=2).audit_backend == "thread"


def test_ray_missing_is_named_with_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises
    with pytest.raises(BackendUnavailable, match=r"pip install 'maxwell-poi\[ray\]'"):
        open_backend("ray", 1)


def test_a_ray_address_nobody_answers_on_is_refused_at_once() -> None:
    """Ray would retry it for minutes; the control plane says so before it starts."""
    with pytest.raises(BackendUnavailable, match="expected a Ray cluster answering at 127.0.0.1:1, got"):
        refuse_unreachable("127.0.0.1:1", timeout_s=2.0)
    refuse_unreachable("auto")  # not host:port: left to Ray


POOL_OWNER = """
import sys
from maxwell_poi.service.audit_backends import AuditJob, ProcessBackend
backend = ProcessBackend(1)
if sys.argv[1] == "warm":
    backend.warm()
else:  # killed while its pool process is still starting (importing torch)
    backend.submit(AuditJob("{}", b"", None, 0.0, ""))
print("ready", flush=True)
input()  # until killed
"""


@pytest.mark.parametrize("when", ["warm", "starting"])
def test_pool_processes_leave_when_the_control_plane_is_killed(when: str) -> None:
    """A SIGKILLed control plane (test_service_crash does it) must not leave its audit process
    behind, holding its models in memory, whether that process was serving or still starting."""
    argv = [sys.executable, "-c", POOL_OWNER, when]
    owner = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == b"ready"
        children = psutil.Process(owner.pid).children(recursive=True)
        assert children, "the pool has started its process"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    _gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]


def test_a_killed_pool_process_is_replaced(jobs: dict[str, AuditJob]) -> None:
    """Out of memory, or killed by hand: the audit in flight fails (its lease stays pending), and
    the next audits run on a new pool rather than on a broken one for good."""
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    backend = open_backend("process", 1)
    try:
        backend.warm()
        (worker,) = [
            p for p in me.children() if p.pid not in before and "spawn_main" in " ".join(p.cmdline())
        ]
        worker.kill()
        worker.wait(timeout=30)
        try:  # the pool may notice the death only on this audit
            backend.submit(jobs["honest"]).result(timeout=TIMEOUT_S)
        except Exception as exc:
            assert type(exc).__name__ == "BrokenProcessPool", exc
        assert _audit(backend, jobs["honest"]).verdict is Verdict.AFFIRMING
    finally:
        backend.close()
