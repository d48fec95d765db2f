"""`poi demo`: honest and cheating agents on real models, as resident agents in Maxwell's measured
sandboxes (node.Node), appraised by the verifier.

Every agent program, honest or not, is started once in its own sandbox and handed its leases
there (several at once where the plan batches them); each run records which accounting source
measured it (cgroup v2/v1, or the /proc fallback) and the node's signed evidence.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adversaries import CATALOGUE, Attack
from ..node import Node, NodeResult
from ..node.attest import NodeKey
from ..node.runs import OFFLINE_ENV, honest_agent_argv
from ..observer.evidence import resident_profile_key
from ..protocol.files import write_json_atomic
from ..protocol.keys import AgentKey, Keyring
from ..protocol.lease import EmbedJob, GenerateJob, Lease
from ..protocol.receipt import open_receipt
from ..protocol.result import AttestationResult, Status, Verdict
from ..registry.models import Registry
from ..registry.profiles import ProfileStore
from ..registry.prompts import PROMPTS, TEXTS
from ..report.trace_plot import plot_demo_dir
from ..verifier.policy import Verifier
from .harness import ensure_profile, has_cuda, python_module

VICTIM = "honest"
log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    model: str = "gpt2-small"  # claimed model for the generation jobs
    small: str = "gpt2-mini"  # what the substitution / draft cheats actually run
    alt: str = "gpt2-small-alt"  # same architecture, other weights
    second_model: str | None = "poi-lm"  # the trained LM; also decoded speculatively
    draft: str | None = "poi-lm-draft"  # second_model's draft for the honest speculative agent
    embed_model: str | None = "minilm-l6-v2"
    tokens: int = 48
    temperature: float = 0.8
    attacks: list[str] | None = None  # None = the whole catalogue
    honest_variants: bool = True
    out: Path = Path("poi-demo")
    profile_runs: int = 4  # honest runs per model when this device has no reference profile yet


@dataclass
class Planned:
    agent: str  # the agent id the lease is issued to
    attack: Attack | None
    lease: Lease
    argv: list[str]
    signer: str  # whose key the program holds
    priming: bool = False
    wave: int = 0  # plans sharing a wave number are handed to their agent at once (a batch)
    pause_s: float = 0.0  # wait this long before handing the lease over (an idle gap)


@dataclass
class DemoRow:
    agent: str
    attack: str | None
    model: str
    verdict: str
    caught_by: list[str]
    reason: str
    agent_wall_s: float
    agent_cpu_s: float
    verify_s: float
    accounting: str = ""  # which source measured the sandbox: cgroup-v2, cgroup-v1 or proc
    batch: int = 1
    output_preview: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "attack": self.attack,
            "model": self.model,
            "verdict": self.verdict,
            "caught_by": self.caught_by,
            "reason": self.reason,
            "agent_wall_s": round(self.agent_wall_s, 3),
            "agent_cpu_s": round(self.agent_cpu_s, 3),
            "verify_s": round(self.verify_s, 4),
            "accounting": self.accounting,
            "batch": self.batch,
            "output_preview": self.output_preview,
        }


class Demo:
    def __init__(self, config: DemoConfig, registry: Registry | None = None) -> None:
        self.cfg = config
        self.registry = registry or Registry()
        self.keyring = Keyring()
        self.keys_dir = config.out / "keys"
        self.skipped: dict[str, str] = {}  # attack classes not run here, with the reason

    def _key(self, agent: str) -> Path:
        path = self.keys_dir / f"{agent}.pem"
        self.keyring.enroll(agent, AgentKey.ensure(path).public_hex)
        return path

    def _gen(self, agent: str, model: str, prompt: str, temperature: float | None = None) -> Lease:
        t = self.cfg.temperature if temperature is None else temperature
        job = GenerateJob(prompt=prompt, max_new_tokens=self.cfg.tokens, temperature=t)
        return Lease.issue(agent, model, job)

    def plan(self) -> list[Planned]:
        cfg = self.cfg
        plans: list[Planned] = []
        waves = itertools.count()

        def honest_run(agent: str, leases: list[Lease], *extra: str) -> list[Planned]:
            argv = honest_agent_argv(self._key(agent), "--resident", *extra)
            wave = next(waves)
            return [Planned(agent, None, lease, argv, agent, wave=wave) for lease in leases]

        plans += honest_run(VICTIM, [self._gen(VICTIM, cfg.model, PROMPTS[0])])
        if cfg.honest_variants:
            plans += honest_run(
                "honest-2threads", [self._gen("honest-2threads", cfg.model, PROMPTS[1])], "--threads", "2"
            )
            batch4 = [self._gen("honest-batch4", cfg.model, PROMPTS[i % len(PROMPTS)]) for i in range(4)]
            plans += honest_run("honest-batch4", batch4, "--max-batch", "4")
        if cfg.second_model:
            plans += honest_run(
                "honest-second-model", [self._gen("honest-second-model", cfg.second_model, PROMPTS[0])]
            )
            if cfg.draft:
                plans += honest_run(
                    "honest-speculative",
                    [self._gen("honest-speculative", cfg.second_model, PROMPTS[1])],
                    "--speculative",
                    cfg.draft,
                )
        if cfg.embed_model:
            plans += honest_run(
                "honest-minilm", [Lease.issue("honest-minilm", cfg.embed_model, EmbedJob(texts=TEXTS))]
            )
        subs = {"small": cfg.small, "alt": cfg.alt, "upstream": str(self.worker_socket)}
        for attack in CATALOGUE:
            if cfg.attacks is not None and attack.name not in cfg.attacks:
                continue
            if attack.needs_gpu and not has_cuda():
                self.skipped[attack.name] = "needs a CUDA GPU; none on this machine"
                continue
            plans.extend(self._attack_plans(attack, subs, waves))
        return plans

    @property
    def worker_socket(self) -> Path:
        return (self.cfg.out / "relay-worker.sock").resolve()

    def ensure_profiles(self, on_progress: Callable[[str, int, int], None] | None = None) -> None:
        """L1 and L2 compare with this device's honest resident profile; measure it once if missing."""
        store = ProfileStore()
        device = resident_profile_key()
        for model in filter(None, (self.cfg.model, self.cfg.second_model, self.cfg.embed_model)):
            known = store.get(model, device)
            if known is None or not known.threads_runs:
                if on_progress:
                    on_progress(f"profiling {model} as a resident agent on this device (once)", 0, 1)
                ensure_profile(
                    model, self.cfg.tokens, self.cfg.profile_runs, batches=(1, 2, 4), registry=self.registry
                )

    def _attack_plans(self, attack: Attack, subs: dict[str, str], waves: Iterator[int]) -> list[Planned]:
        cfg = self.cfg
        agent = attack.name
        signer = "mallory" if attack.name == "other-agents-lease" else agent
        leased_to = VICTIM if attack.name in ("other-agents-lease", "forged-signature") else agent
        store = cfg.out / "store" / agent
        args = [a.format(store=store, **subs) for a in attack.args]
        argv = python_module(
            f"maxwell_poi.adversaries.{attack.module}", self._key(signer), "--resident", *args
        )
        self._key(leased_to)
        out = []

        def add(
            leases: list[Lease], honest_first: bool = False, priming: bool = False, pause_s: float = 0.0
        ) -> None:
            """One wave; `honest_first`: a batching cheat computes all but the last lease honestly
            (its copy's source), so only the last is its judged cheat and the rest are priming."""
            wave, last = next(waves), len(leases) - 1
            out.extend(
                Planned(
                    leased_to, attack, lease, argv, signer,
                    priming=priming or (honest_first and i < last), wave=wave, pause_s=pause_s,
                )
                for i, lease in enumerate(leases)
            )  # fmt: skip

        if "generate" in attack.kinds:
            if attack.needs_priming:  # the cheat needs an earlier answer (or an idle gap) first
                add([self._gen(leased_to, cfg.model, PROMPTS[0])], priming=True)
            temperature = 0.0 if attack.greedy else None
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(attack.batch)]
            add(
                [self._gen(leased_to, cfg.model, p, temperature) for p in prompts],
                honest_first=attack.batch > 1,
                pause_s=attack.pause_s,
            )
        if "embed" in attack.kinds and cfg.embed_model:
            add([Lease.issue(leased_to, cfg.embed_model, EmbedJob(texts=TEXTS))], pause_s=attack.pause_s)
        return out

    def run(self, on_progress: Callable[[str, int, int], None] | None = None) -> list[DemoRow]:
        if self.cfg.out.exists():
            shutil.rmtree(self.cfg.out / "runs", ignore_errors=True)
            shutil.rmtree(self.cfg.out / "store", ignore_errors=True)
        self.ensure_profiles(on_progress)
        plans = self.plan()
        verifier = Verifier.default(self.registry, self.keyring)
        rows: list[DemoRow] = []
        done = 0
        needs_worker = any(p.attack is not None and p.attack.needs_worker for p in plans)
        with (
            Node("demo-node", NodeKey.ensure(self.keys_dir / "node.pem"), verifier, self.registry) as node,
            self.relay_worker(needs_worker),
        ):
            for _, group in itertools.groupby(plans, key=lambda p: (p.agent, p.signer, tuple(p.argv))):
                group = list(group)
                name = f"{group[0].attack.name if group[0].attack else group[0].agent}-{done}"
                node.start_agent(name, group[0].argv)
                for _, wave_iter in itertools.groupby(group, key=lambda p: p.wave):
                    wave = list(wave_iter)
                    if on_progress:
                        first = wave[0]
                        label = f"{first.attack.name if first.attack else 'honest'} ({first.lease.model_id})"
                        batch = f" x{len(wave)}" if len(wave) > 1 else ""
                        priming = all(p.priming for p in wave)
                        on_progress(("priming " if priming else "") + label + batch, done, len(plans))
                    time.sleep(wave[0].pause_s)
                    for plan, result in zip(wave, node.serve(name, [p.lease for p in wave]), strict=True):
                        row = self._record(plan, result, done)
                        done += 1
                        if not plan.priming:
                            rows.append(row)
                node.stop_agent(name)
        if on_progress:
            on_progress("done", len(plans), len(plans))
        self._write(rows)
        return rows

    @contextlib.contextmanager
    def relay_worker(self, needed: bool) -> Iterator[None]:
        """The honest worker a relay forwards its leases to: a plain process, outside every
        sandbox (standing in for a machine elsewhere)."""
        if not needed:
            yield
            return
        self.worker_socket.unlink(missing_ok=True)
        argv = python_module("maxwell_poi.adversaries.relay_worker", self._key("relay-worker"))
        worker = subprocess.Popen(
            [*argv, "--listen", str(self.worker_socket)],
            env={**os.environ, **OFFLINE_ENV},
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not self.worker_socket.exists() and time.monotonic() < deadline and worker.poll() is None:
                time.sleep(0.05)
            yield
        finally:
            worker.kill()
            worker.wait()

    def report(self, rows: list[DemoRow]) -> dict[str, Any]:
        return report(rows, self.skipped)

    def _record(self, plan: Planned, r: NodeResult, index: int) -> DemoRow:
        run, result = r.run, r.result
        name = plan.attack.name if plan.attack else plan.agent
        run_dir = self.cfg.out / "runs" / f"{index:02d}-{name}{'-priming' if plan.priming else ''}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "lease.json").write_text(plan.lease.to_json())
        meta = {
            "leased_to": plan.agent,
            "signer": plan.signer,
            "attack": plan.attack.name if plan.attack else None,
            "priming": plan.priming,
            "argv": plan.argv[1:],
        }
        write_json_atomic(run_dir / "run.json", meta)
        (run_dir / "receipt.json").write_bytes(run.receipt)
        (run_dir / "evidence.dsse.json").write_bytes(r.signed_evidence)
        write_json_atomic(run_dir / "evidence.json", run.evidence.as_dict())
        write_json_atomic(run_dir / "result.json", result.as_dict())
        try:  # a picture of the evidence is a convenience: it never fails the demo
            attack = plan.attack.name if plan.attack else None
            plot_demo_dir(run_dir, ProfileStore(), attack=attack, registry=self.registry)
        except Exception as exc:
            log.warning("%s: trace.png not drawn: %s: %s", run_dir, type(exc).__name__, exc)
        return DemoRow(
            agent=plan.signer if plan.signer != plan.agent else plan.agent,
            attack=plan.attack.name if plan.attack else None,
            model=plan.lease.model_id,
            verdict=result.verdict.value,
            caught_by=[str(name) for name in result.caught_by],
            # affirmed: what passed; otherwise the failures, warnings and what was not measured
            reason=_short_pass(result) if result.verdict is Verdict.AFFIRMING else result.reason,
            agent_wall_s=run.evidence.wall_s,
            agent_cpu_s=run.evidence.cpu_s,
            verify_s=r.verify_s,
            accounting=str(run.evidence.accounting.get("source", "")),
            batch=1 + run.evidence.co_leases,
            output_preview=self._preview(plan.lease, result.verdict, run.receipt) if not plan.attack else "",
            result=result.as_dict(),
        )

    def _write(self, rows: list[DemoRow]) -> None:
        write_json_atomic(self.cfg.out / "results.json", report(rows, self.skipped))

    def _preview(self, lease: Lease, verdict: Verdict, raw: bytes) -> str:
        """The start of an affirmed generation's text (tokenizer only; no model is built)."""
        if verdict is not Verdict.AFFIRMING or not isinstance(lease.job, GenerateJob):
            return ""
        tokens = open_receipt(raw, len(raw)).claims.tokens()
        return self.registry.decode(lease.model_id, tokens)[:80]


def _short_pass(result: AttestationResult) -> str:
    return "; ".join(r.reason for r in result.layers if r.status is Status.PASS)


def report(rows: list[DemoRow], skipped: dict[str, str] | None = None) -> dict[str, Any]:
    honest = [r for r in rows if r.attack is None]
    cheats = [r for r in rows if r.attack is not None]
    return {
        "runs": [r.summary() for r in rows],
        "summary": {
            "honest_runs": len(honest),
            "honest_affirmed": sum(r.verdict == Verdict.AFFIRMING for r in honest),
            "attack_runs": len(cheats),
            "attack_classes": len({r.attack for r in cheats}),
            "attacks_contraindicated": sum(r.verdict == Verdict.CONTRAINDICATED for r in cheats),
            "accounting_sources": {
                src: sum(r.accounting == src for r in rows) for src in {r.accounting for r in rows}
            },
        },
        "skipped_attacks": skipped or {},
    }
