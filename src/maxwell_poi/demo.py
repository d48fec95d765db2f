"""`poi demo`: honest and cheating agents on real models, through Maxwell's runner and verifier."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adversaries import CATALOGUE, Attack
from .observer.host import this_device
from .observer.runs import honest_agent_argv, measure_profile, run_lease
from .protocol.files import write_json_atomic
from .protocol.keys import AgentKey, Keyring
from .protocol.lease import EmbedJob, GenerateJob, Lease
from .protocol.receipt import open_receipt
from .protocol.result import AttestationResult, Status, Verdict
from .registry.models import Registry
from .registry.profiles import ProfileStore
from .registry.prompts import PROMPTS, TEXTS
from .report.trace_plot import plot_demo_dir
from .verifier.policy import Verifier

VICTIM = "honest"
log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    model: str = "gpt2-small"  # claimed model for the generation jobs
    small: str = "gpt2-mini"  # what the substitution / draft cheats actually run
    alt: str = "gpt2-small-alt"  # same architecture, other weights
    second_model: str | None = "llama-small"
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
            "output_preview": self.output_preview,
        }


def _python_module(module: str, key: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", module, "--key", str(key), *extra]


class Demo:
    def __init__(self, config: DemoConfig, registry: Registry | None = None) -> None:
        self.cfg = config
        self.registry = registry or Registry()
        self.keyring = Keyring()
        self.keys_dir = config.out / "keys"
        self.skipped: dict[str, str] = {}  # attack classes not run here, with the reason

    def _key(self, agent: str) -> Path:
        path = self.keys_dir / f"{agent}.pem"
        if not path.exists():
            key = AgentKey.generate()
            key.save(path)
        self.keyring.enroll(agent, AgentKey.load(path).public_hex)
        return path

    def _gen(self, agent: str, model: str, prompt: str, temperature: float | None = None) -> Lease:
        t = self.cfg.temperature if temperature is None else temperature
        job = GenerateJob(prompt=prompt, max_new_tokens=self.cfg.tokens, temperature=t)
        return Lease.issue(agent, model, job)

    def plan(self) -> list[Planned]:
        cfg = self.cfg
        plans: list[Planned] = []

        def honest_run(agent: str, lease: Lease, *extra: str) -> Planned:
            return Planned(agent, None, lease, honest_agent_argv(self._key(agent), *extra), agent)

        plans.append(honest_run(VICTIM, self._gen(VICTIM, cfg.model, PROMPTS[0])))
        if cfg.honest_variants:
            plans.append(
                honest_run(
                    "honest-2threads",
                    self._gen("honest-2threads", cfg.model, PROMPTS[1]),
                    "--threads",
                    "2",
                )
            )
            plans.append(
                honest_run(
                    "honest-batch4",
                    self._gen("honest-batch4", cfg.model, PROMPTS[2]),
                    "--batch",
                    "4",
                )
            )
        if cfg.second_model:
            plans.append(
                honest_run(
                    "honest-second-model", self._gen("honest-second-model", cfg.second_model, PROMPTS[0])
                )
            )
        if cfg.embed_model:
            plans.append(
                honest_run(
                    "honest-minilm", Lease.issue("honest-minilm", cfg.embed_model, EmbedJob(texts=TEXTS))
                )
            )
        subs = {"small": cfg.small, "alt": cfg.alt}
        for attack in CATALOGUE:
            if cfg.attacks is not None and attack.name not in cfg.attacks:
                continue
            if attack.needs_gpu and not _has_cuda():
                self.skipped[attack.name] = "needs a CUDA GPU; none on this machine"
                continue
            plans.extend(self._attack_plans(attack, subs))
        return plans

    def ensure_profiles(self, on_progress: Callable[[str, int, int], None] | None = None) -> None:
        """L1 and L2 compare with this device's honest profile; measure it once if missing."""
        store = ProfileStore()
        for model in filter(None, {self.cfg.model, self.cfg.second_model}):
            if store.get(model, this_device()) is None:
                if on_progress:
                    on_progress(f"profiling {model} on this device (once)", 0, self.cfg.profile_runs)
                store.put(
                    measure_profile(
                        model, runs=self.cfg.profile_runs, tokens=self.cfg.tokens, registry=self.registry
                    )
                )

    def _attack_plans(self, attack: Attack, subs: dict[str, str]) -> list[Planned]:
        cfg = self.cfg
        agent = attack.name
        signer = "mallory" if attack.name == "other-agents-lease" else agent
        leased_to = VICTIM if attack.name in ("other-agents-lease", "forged-signature") else agent
        store = cfg.out / "store" / agent
        args = [a.format(store=store, **subs) for a in attack.args]
        argv = _python_module(f"maxwell_poi.adversaries.{attack.module}", self._key(signer), *args)
        self._key(leased_to)
        out = []
        if "generate" in attack.kinds:
            if attack.needs_priming:  # the cheat needs an earlier answer to reuse
                out.append(
                    Planned(
                        leased_to,
                        attack,
                        self._gen(leased_to, cfg.model, PROMPTS[0]),
                        argv,
                        signer,
                        priming=True,
                    )
                )
            out.append(Planned(leased_to, attack, self._gen(leased_to, cfg.model, PROMPTS[0]), argv, signer))
        if "embed" in attack.kinds and cfg.embed_model:
            lease = Lease.issue(leased_to, cfg.embed_model, EmbedJob(texts=TEXTS))
            out.append(Planned(leased_to, attack, lease, argv, signer))
        return out

    def run(self, on_progress: Callable[[str, int, int], None] | None = None) -> list[DemoRow]:
        if self.cfg.out.exists():
            shutil.rmtree(self.cfg.out / "runs", ignore_errors=True)
            shutil.rmtree(self.cfg.out / "store", ignore_errors=True)
        self.ensure_profiles(on_progress)
        plans = self.plan()
        verifier = Verifier.default(self.registry, self.keyring)
        rows: list[DemoRow] = []
        for i, plan in enumerate(plans):
            label = f"{plan.attack.name if plan.attack else 'honest'} ({plan.lease.model_id})"
            if on_progress:
                on_progress(("priming " if plan.priming else "") + label, i, len(plans))
            row = self._run_one(verifier, plan, i)
            if not plan.priming:
                rows.append(row)
        if on_progress:
            on_progress("done", len(plans), len(plans))
        self._write(rows)
        return rows

    def report(self, rows: list[DemoRow]) -> dict[str, Any]:
        return report(rows, self.skipped)

    def _run_one(self, verifier: Verifier, plan: Planned, index: int) -> DemoRow:
        run = run_lease(plan.argv, plan.lease, self.registry)
        t0 = time.perf_counter()
        result: AttestationResult = verifier.appraise(plan.lease, run.receipt, run.evidence)
        verify_s = time.perf_counter() - t0
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
            reason=result.reason if result.caught_by else _short_pass(result),
            agent_wall_s=run.evidence.wall_s,
            agent_cpu_s=run.evidence.cpu_s,
            verify_s=verify_s,
            output_preview=self._preview(plan.lease, result, run.receipt) if not plan.attack else "",
            result=result.as_dict(),
        )

    def _write(self, rows: list[DemoRow]) -> None:
        write_json_atomic(self.cfg.out / "results.json", report(rows, self.skipped))

    def _preview(self, lease: Lease, result: AttestationResult, raw: bytes) -> str:
        """The start of an affirmed generation's text (tokenizer only; no model is built)."""
        if result.verdict is not Verdict.AFFIRMING or not isinstance(lease.job, GenerateJob):
            return ""
        tokens = open_receipt(raw, len(raw)).claims.tokens()
        return self.registry.decode(lease.model_id, tokens)[:80]


def _short_pass(result: AttestationResult) -> str:
    return "; ".join(r.reason for r in result.layers if r.status is Status.PASS)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
        },
        "skipped_attacks": skipped or {},
    }
