"""Serving leases to resident agents: the path `poi node`, the demo, resident profiling and the
node benchmark take, and the honest resident runs a batched reference profile is measured from."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..observer.evidence import RESIDENT_REGIME, LeaseEvidence, profile_conditions, resident_profile_key
from ..observer.host import measure_peak_flops
from ..protocol.engine import engine_of_command
from ..protocol.keys import AgentKey
from ..protocol.lease import EmbedJob, GenerateJob, Lease
from ..protocol.receipt import max_receipt_bytes
from ..registry.models import Registry
from ..registry.profiles import Profile, Stats
from ..registry.prompts import PROMPTS, TEXTS
from .channel import AgentRun
from .probe import WorkProbes
from .resident import ResidentAgent, StreamWatch
from .runs import OFFLINE_ENV, honest_agent_argv


def start_resident(
    argv: list[str], name: str, cwd: str | None = None, probes: WorkProbes | None = None
) -> ResidentAgent:
    """An agent program started once in its own sandbox, offline, ready for leases; with `probes`,
    each generation lease is probed while it streams (node.probe)."""
    return ResidentAgent(argv, name=name, env=OFFLINE_ENV, cwd=cwd, probes=probes)


def serve_wave(
    agent: ResidentAgent,
    leases: Sequence[Lease],
    registry: Registry,
    timeout_s: float | None = None,
    watch: Callable[[Lease], StreamWatch | None] | None = None,
) -> list[AgentRun]:
    """Hand `leases` to the agent at once (it may batch them), then collect every answer. `watch`
    gives a lease's live watcher (the gateway's relay), or None."""
    for lease in leases:
        max_bytes = max_receipt_bytes(lease, registry.reference(lease.model_id).hidden)
        agent.submit(lease, max_bytes, watch(lease) if watch else None)
    return [agent.collect(lease.lease_id, timeout_s) for lease in leases]


def generate_leases(
    model_id: str, count: int, tokens: int, start: int = 0, agent_id: str = "profiler"
) -> list[Lease]:
    return [
        Lease.issue(
            agent_id, model_id, GenerateJob(prompt=PROMPTS[(start + i) % len(PROMPTS)], max_new_tokens=tokens)
        )
        for i in range(count)
    ]


def embed_leases(model_id: str, count: int, start: int = 0, agent_id: str = "profiler") -> list[Lease]:
    return [
        Lease.issue(agent_id, model_id, EmbedJob(texts=[TEXTS[(start + i) % len(TEXTS)]]))
        for i in range(count)
    ]


def window_cpu_per_token(run: AgentRun) -> float:
    """Sandbox CPU seconds per token streamed (by any lease) in this lease's decode window."""
    w = run.evidence.decode_window
    if w is None:
        raise RuntimeError(f"no decode window: {run.evidence.stderr_tail[-300:]}")
    return w.cpu_s / w.batch_tokens


def honest_resident(
    key_dir: Path, max_batch: int, threads: int | None = None, engine_cmd: str | None = None
) -> ResidentAgent:
    """The honest reference agent, resident in a sandbox; with `engine_cmd`, the engine adapter
    serving through that engine command (`poi agent --resident --engine-cmd`), started as its child."""
    return start_resident(honest_resident_argv(key_dir, max_batch, threads, engine_cmd), "honest")


def honest_resident_argv(
    key_dir: Path, max_batch: int, threads: int | None = None, engine_cmd: str | None = None
) -> list[str]:
    key = key_dir / "honest.pem"
    AgentKey.ensure(key)
    if engine_cmd:
        return honest_agent_argv(key, "--resident", "--engine-cmd", engine_cmd)
    extra = ["--resident", "--max-batch", str(max_batch)] + (["--threads", str(threads)] if threads else [])
    return honest_agent_argv(key, *extra)


def _checked(runs: list[AgentRun]) -> list[AgentRun]:
    for r in runs:
        if r.timed_out or not r.receipt:
            raise RuntimeError(f"honest resident run failed: {r.evidence.stderr_tail[-500:]}")
    return runs


def honest_batches(
    model_id: str,
    batches: Sequence[int],
    runs: int,
    tokens: int,
    registry: Registry,
    threads: int | None = None,
    engine_cmd: str | None = None,
) -> Iterator[tuple[int, list[AgentRun]]]:
    """Honest resident waves: `runs` waves at each batch size (after one warm-up lease); with
    `engine_cmd`, of the engine adapter serving through it."""
    with tempfile.TemporaryDirectory() as tmp:
        warm_host_caches(model_id, registry, Path(tmp), engine_cmd)
        yield from _honest_waves(model_id, batches, runs, tokens, registry, threads, Path(tmp), engine_cmd)


def warm_host_caches(model_id: str, registry: Registry, key_dir: Path, engine_cmd: str | None = None) -> None:
    """One throwaway agent answers one lease first. The kernel charges a shared library's (and a
    weights file's) page cache to the first sandbox that reads it: measured cold, the profile's peak
    memory was 33 MB above what every later honest gpt2-mini agent showed, and L1's memory floor
    refused them. Measured warm, the profile is what an agent on a running host looks like; a cold
    agent only shows more memory, which the floor allows."""
    leases = (
        embed_leases(model_id, 1)
        if registry.get(model_id).kind == "embedding"
        else generate_leases(model_id, 1, 2)
    )
    with honest_resident(key_dir, 1, engine_cmd=engine_cmd) as agent:
        _checked(serve_wave(agent, leases, registry))


def _honest_waves(
    model_id: str,
    batches: Sequence[int],
    runs: int,
    tokens: int,
    registry: Registry,
    threads: int | None,
    tmp: Path,
    engine_cmd: str | None = None,
) -> Iterator[tuple[int, list[AgentRun]]]:
    with honest_resident(tmp, max(batches), threads, engine_cmd) as agent:
        _checked(serve_wave(agent, generate_leases(model_id, 1, 2), registry))  # loads the model
        for b in batches:
            for i in range(runs):
                yield (
                    b,
                    _checked(serve_wave(agent, generate_leases(model_id, b, tokens, start=i * b), registry)),
                )


def measure_resident_profile(
    model_id: str,
    *,
    runs: int = 3,
    tokens: int = 32,
    batches: Sequence[int] = (1, 2, 4),
    registry: Registry | None = None,
    on_progress: Callable[[str], None] | None = None,
    engine_cmd: str | None = None,
) -> Profile:
    """What honest serving of `model_id` by a resident agent looks like on this device: per batch
    size, sandbox CPU per token of the batch; at batch 1 also pace, cores busy and memory. For an
    embedding model, CPU per input token over the whole lease window. With `engine_cmd`: the engine
    adapter serving through that engine (`poi agent --resident --engine-cmd`), stored under that
    engine's own key (`resident_profile_key(engine_of_command(...))`): an engine's work per token is
    its own, and only an agent enrolled with the same engine command is judged by it."""
    registry = registry or Registry()
    if registry.get(model_id).kind == "embedding":
        if engine_cmd:
            raise ValueError("an engine profile: expected a generation model, got an embedding model")
        return _embed_profile(model_id, runs, registry, on_progress)
    per_batch: dict[int, list[float]] = {}
    intervals, busy, memory, lone = [], [], [], []
    for b, wave in honest_batches(model_id, batches, runs, tokens, registry, engine_cmd=engine_cmd):
        # one value per wave: its leases share one window's CPU, they are not independent samples
        per_batch.setdefault(b, []).append(statistics.fmean(window_cpu_per_token(r) for r in wave))
        if b == 1:
            ev = wave[0].evidence
            w = ev.decode_window
            assert w is not None
            intervals.append(statistics.median(np.diff(ev.stream_t)))
            lone.append(ev)
            busy.append(w.cpu_s / w.wall_s if w.wall_s > 0 else 0.0)
            memory.append(ev.peak_rss_mb())
        if on_progress:
            on_progress(f"{model_id} batch {b}: {per_batch[b][-1] * 1000:.1f} CPU-ms per token of the batch")
    if not intervals:
        raise ValueError("measure_resident_profile: batch size 1 must be among `batches`")
    engine = lone[0].engine  # the node's record of the command it ran ("" for the SDK agent)
    assert engine == (engine_of_command(["--engine-cmd", engine_cmd]) if engine_cmd else "")
    return _profile(
        model_id, tokens, per_batch[1], intervals, busy, memory, per_batch=per_batch, lone=lone, engine=engine
    )


def _embed_profile(
    model_id: str, runs: int, registry: Registry, on_progress: Callable[[str], None] | None
) -> Profile:
    with tempfile.TemporaryDirectory() as tmp:
        warm_host_caches(model_id, registry, Path(tmp))
        return _embed_runs(model_id, runs, registry, on_progress, Path(tmp))


def _embed_runs(
    model_id: str, runs: int, registry: Registry, on_progress: Callable[[str], None] | None, tmp: Path
) -> Profile:
    per_token, walls, memory = [], [], []
    with honest_resident(tmp, 1) as agent:
        _checked(serve_wave(agent, embed_leases(model_id, 1), registry))  # loads the model
        for i in range(max(runs, 3)):
            lease = embed_leases(model_id, 1, start=i)[0]
            (run,) = _checked(serve_wave(agent, [lease], registry))
            assert isinstance(lease.job, EmbedJob)
            per_token.append(run.evidence.cpu_s / registry.embed_input_tokens(model_id, lease.job.texts))
            walls.append(run.evidence.wall_s)
            memory.append(run.evidence.peak_rss_mb())
            if on_progress:
                on_progress(
                    f"{model_id} embedding {i + 1}: {per_token[-1] * 1000:.2f} CPU-ms per input token"
                )
    return _profile(model_id, 0, per_token, walls, [1.0], memory, embed=per_token)


def _profile(
    model_id: str,
    tokens: int,
    cpu_per_token: list[float],
    intervals: list[float],
    busy: list[float],
    memory: list[float],
    *,
    per_batch: dict[int, list[float]] | None = None,
    embed: list[float] | None = None,
    lone: list[LeaseEvidence] | None = None,
    engine: str = "",
) -> Profile:
    """`lone`: the evidence of the unbatched generation runs (their pace on a free core and the
    contention they saw)."""
    free = [ev.free_interval_s() for ev in lone or []]
    return Profile.from_runs(
        resident_profile_key(engine),
        model_id,
        tokens,
        intervals=intervals,
        cpu_per_token=cpu_per_token,
        busy=busy,
        memory=memory,
        peak=measure_peak_flops(),
        measured_at=time.time(),
        regime=RESIDENT_REGIME,
        batch_cpu_s_per_token={str(b): Stats.of(v) for b, v in (per_batch or {}).items()},
        embed_cpu_s_per_token=Stats.of(embed) if embed else None,
        interval_free_s=Stats.of(free) if free and all(f is not None for f in free) else None,  # type: ignore[arg-type]
        conditions={k: Stats.of(v) for k, v in profile_conditions(lone or []).items()},
    )
