"""Every block checked on every challenged lease (issue 24 item 6): what it catches and what it costs,
this CPU, one run.

- `one_block_cheat_caught_per_challenged_lease`: through the control plane (uvicorn on loopback), a
  node long-polling it and real resident agents in sandboxes (gpt2-small, 12 blocks, every lease in
  the exact tier): the one-block adversary (`adversaries/wrong_block.py`, 0.1 % multiplicative
  noise on one block's weights — what L4's fingerprints miss) at the first, a middle and the last
  block, and an honest agent. Each lease's L3 challenge opens every block (verifier.every_block);
  counted per challenged lease: caught, and honest leases passed. The node's work probe is off, so
  every lease reaches its challenge (the probe, an L2 check, catches some of these leases inline;
  not what is measured here); the L4 lottery runs as the policy draws it and is recorded.
- `exact_all_blocks_vs_generation`: Maxwell's whole L3 challenge of one lease, in process (the
  openings as the service plans them, each rebuilt against the signed root with every tensor's leaf
  digest, and every block's Freivalds check and replay) over generating the same tokens without a
  trace; `checks_only` (every block's check, no digests) beside it, as bench/exact/audits.py's
  `exact_audit_vs_generation` times it. Interleaved, median of three, at that bench's shapes:
  GPT-2-small, llama-small, a ~1B GPT-2 shape (d 2048 x 20) and the TinyLlama-1.1B shape (d 2048 x 22,
  GQA 32/4), seeded weights, one torch thread.

    python -m bench.exact.every_block     # writes two keys of bench/results/integrity.json (~10 min)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.exact.audits import PROMPT, big_gpt2, big_llama, interleaved, traced  # noqa: E402
from maxwell_poi.prover.harness import quiet_libraries
from maxwell_poi.registry.forward import generate
from maxwell_poi.registry.models import LoadedModel, Registry
from maxwell_poi.registry.sampling import SeededSampler

quiet_libraries()
from bench.common.results import command, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "integrity.json": ["one_block_cheat_caught_per_challenged_lease", "exact_all_blocks_vs_generation"]
}  # the keys of bench/results/integrity.json this script writes (bench/common/results.py)
MODEL = "gpt2-small"
NOISE = 0.001
CHEAT_BLOCKS = (0, 6, 11)  # first, middle, last of gpt2-small's 12
TOKENS = 16
STAKE = 5_000_000  # large: the deterrence rule's L4 lottery rarely draws, L3 is what checks
DEPOSIT = 500_000_000


# -- caught per challenged lease, through the service ------------------------------------------------


def agents(tmp: Path) -> dict[str, list[str]]:
    """Agent name -> its command line (a key each, a trace dir each)."""
    from maxwell_poi.protocol.keys import AgentKey

    out = {}
    for name in ["honest", *(f"cheat-b{b}" for b in CHEAT_BLOCKS)]:
        key = tmp / f"{name}.pem"
        AgentKey.generate().save(key)
        traces = ["--trace-dir", str(tmp / "traces" / name)]
        if name == "honest":
            program = ["-m", "maxwell_poi", "agent", "--resident", *traces]
        else:
            block = name.removeprefix("cheat-b")
            program = ["-m", "maxwell_poi.adversaries.wrong_block", "--resident", "--block", block,
                       "--noise", str(NOISE), *traces]  # fmt: skip
        out[name] = [sys.executable, *program, "--key", str(key)]
    return out


def serve_leases(tmp: Path, leases: int, honest: int) -> list[dict[str, Any]]:
    """Each cheat bids `leases` exact-tier leases, the honest agent `honest`; each lease's verdict row
    once all are final."""
    from maxwell_poi.demo.exact import ExactAgent, lease_row
    from maxwell_poi.demo.harness import LoopbackServer
    from maxwell_poi.node.attest import NodeKey
    from maxwell_poi.node.node import Node
    from maxwell_poi.node.remote import RemoteNode
    from maxwell_poi.node.resident_runs import measure_resident_profile
    from maxwell_poi.protocol.keys import AgentKey
    from maxwell_poi.registry.profiles import ProfileStore
    from maxwell_poi.registry.prompts import PROMPTS
    from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig
    from maxwell_poi.service.api import create_app

    ProfileStore().put(measure_resident_profile(MODEL, runs=5, tokens=TOKENS, batches=(1,)))
    token = "bench-every-block"
    config = ServiceConfig(db=str(tmp / "cp.sqlite"), admin_token=token, audit_backend="thread",
                           challenge_window_s=1.0, opening_timeout_s=120.0, exact_blocks=12)  # fmt: skip
    config.validate()
    control = ControlPlane(config)
    control.start()
    stop = threading.Event()
    try:
        with LoopbackServer(create_app(control)) as url, Node("bench-node", NodeKey.generate(), None) as node:
            node.probes = None  # L3 alone: every lease reaches its challenge (see the docstring)
            admin = ServiceClient(url, admin_token=token)
            admin.set_policy(**{**admin.policy().model_dump(), "exact_from_value": 0.0})
            admin.enroll_node(node.node_id, node.key.public_hex)
            node_client = ServiceClient(url, key=node.key, principal=f"node:{node.node_id}")
            remote = RemoteNode(node_client, node, batch=1, poll_s=0.05, wait_s=2.0, headroom=lambda: 1e6)
            thread = threading.Thread(target=remote.run, args=(stop,), daemon=True)
            thread.start()
            clients, shown = {}, {}
            for name, argv in agents(tmp).items():
                key = AgentKey.load(Path(argv[-1]))
                admin.enroll_agent(name, key.public_hex, argv)
                admin.deposit(name, DEPOSIT, f"bench-{name}")
                clients[name] = ServiceClient(url, key=key, principal=f"agent:{name}")
                shown[name] = ExactAgent(name, MODEL, name, STAKE)
                for i in range(honest if name == "honest" else leases):
                    job = {"kind": "generate", "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": TOKENS}
                    clients[name].bid({"bid_id": f"{name}-{i}", "model_id": MODEL, "job": job,
                                       "price_micro_per_j": 100, "stake_micro": STAKE})  # fmt: skip
            found = wait_for_receipts(clients, 3 * leases + honest)

            if not control.drain(1800):
                raise RuntimeError("exact-tier leases still pending after 1800 s")
            rows = [lease_row(shown[n], clients[n].lease(lid), admin.challenges(lid)) for n, lid in found]
            stop.set()
            thread.join(timeout=30)
    finally:
        stop.set()
        control.close()
    return rows


def wait_for_receipts(
    clients: dict[str, Any], expected: int, timeout_s: float = 1800
) -> list[tuple[str, str]]:
    """(agent, lease id) of every lease once its receipt is in (the node serves them as it pulls)."""
    deadline, found = time.monotonic() + timeout_s, set()
    while len(found) < expected and time.monotonic() < deadline:
        for name, client in clients.items():
            found.update((name, v.lease_id) for v in client.leases() if v.verdict is not None)
        time.sleep(0.5)
    if len(found) < expected:
        raise RuntimeError(
            f"{expected - len(found)} of {expected} leases got no receipt in {timeout_s:.0f} s"
        )
    return sorted(found)


def caught_per_lease(rows: list[dict[str, Any]], leases: int, honest_leases: int) -> dict[str, Any]:
    """Per challenged lease (an L3 challenge, not a dispute, was its last word): cheats caught by L3
    and honest leases passed; what happened to the others is listed, never dropped."""
    per: list[dict[str, Any]] = []
    for r in rows:
        challenge = [d for d in r["l3"] if d["status"] in ("pass", "fail")] if r["dispute"] is None else []
        per.append({"agent": r["agent"], "verdict": r["verdict"], "l4": r["l4"],
                    "challenged": bool(challenge), "l3": challenge[0]["status"] if challenge else None,
                    "reason": (challenge[0]["reason"] if challenge else r["reason"])[:140],
                    "openings": len(r["openings"])})  # fmt: skip
    cheats = [p for p in per if p["agent"] != "honest" and p["challenged"]]
    honest = [p for p in per if p["agent"] == "honest" and p["challenged"]]
    caught = sum(p["l3"] == "fail" and p["verdict"] == "contraindicated" for p in cheats)
    named = sum(p["reason"].startswith(f"block {p['agent'].removeprefix('cheat-b')} ") for p in cheats)
    passed = sum(p["l3"] == "pass" and p["verdict"] == "affirming" for p in honest)
    by_block = {}
    for b in CHEAT_BLOCKS:
        mine = [p for p in cheats if p["agent"] == f"cheat-b{b}"]
        by_block[str(b)] = {"caught": sum(p["l3"] == "fail" for p in mine), "of": len(mine)}
    return {
        "caught": caught,
        "trials": len(cheats),
        "rate": round(caught / len(cheats), 4) if cheats else None,
        "named_the_block": named,
        "by_block": by_block,
        "honest": {"passed": passed, "of": len(honest)},
        "not_challenged": [p for p in per if not p["challenged"]],
        "setup": f"{MODEL} (12 blocks), {TOKENS} tokens a lease, {leases} leases per cheat, "
        f"{honest_leases} honest; cheat: "
        f"adversaries/wrong_block.py --noise {NOISE} at block {', '.join(map(str, CHEAT_BLOCKS))}; every "
        "block opened per challenge (exact_blocks 12 per opening within the relay's byte budget); "
        "node's work probe off; L4 lottery as the policy draws it (column l4)",
        "leases": per,
        "command": command(),
    }


# -- the cost of checking every block, in process ------------------------------------------------------


def all_blocks_vs_generation(model: LoadedModel, tokens: int, rounds: int = 3) -> dict[str, Any]:
    from maxwell_poi.protocol.receipt import ReceiptClaims
    from maxwell_poi.protocol.trace import Opening, opening_keys
    from maxwell_poi.verifier.every_block import check_every_block, plan_openings
    from maxwell_poi.verifier.exact import FreivaldsKey, audit_blocks

    prompt = model.encode_prompt(PROMPT)
    out, trace = traced(model, prompt, tokens)
    nonce = os.urandom(32)
    leaves = trace.leaves(nonce)  # the agent's side, sent with every opening: not Maxwell's cost
    claims = ReceiptClaims.model_construct(trace=trace.root(nonce))  # only the root is read

    def opener(blocks: list[int]) -> Opening:
        return Opening({k: trace.tensors[k] for k in opening_keys(blocks, trace.blocks, trace.ops)}, leaves)

    key = FreivaldsKey.for_model(model)
    plan = plan_openings(model, len(prompt) + len(out))
    found = check_every_block(claims, nonce, model, key, plan, opener)
    assert found.ok, found.reason  # honest: every block holds
    everything = Opening.of(trace, nonce, list(range(trace.blocks)))
    times = interleaved(
        {
            "challenge": lambda: check_every_block(claims, nonce, model, key, plan, opener),
            "checks_only": lambda: audit_blocks(model, key, everything, list(range(trace.blocks))),
            "generate": lambda: generate(model, prompt, tokens, SeededSampler(b"s" * 32, 0.8, 50)),
        },
        rounds,
    )
    cfg = model.module.config
    return {
        "all_blocks_vs_generation": round(times["challenge"] / times["generate"], 4),
        "checks_only_vs_generation": round(times["checks_only"] / times["generate"], 4),
        "blocks": trace.blocks,
        "width": cfg.hidden_size,
        "positions": trace.positions,
        "tokens": tokens,
        "openings": len(plan),
        "opened_bytes": sum(t.nbytes for t in everything.tensors.values()),
    }


def costs(registry: Registry, skip_1b: bool) -> dict[str, Any]:
    small = registry.load("gpt2-small")
    shapes = {
        "gpt2-small": all_blocks_vs_generation(small, 32),
        "llama-small": all_blocks_vs_generation(registry.load("llama-small"), 32),
    }
    if not skip_1b:
        shapes["gpt2-shape-1b (d2048 x 20, seeded)"] = all_blocks_vs_generation(big_gpt2(small), 16)
        gc.collect()
        llama = big_llama(registry.load("llama-small"))
        shapes["llama-shape-1b (TinyLlama 2048 x 22, GQA 32/4, seeded)"] = all_blocks_vs_generation(llama, 16)
        del llama
        gc.collect()
    return {
        **{k: v["all_blocks_vs_generation"] for k, v in shapes.items()},
        "shapes": shapes,
        "how": "Maxwell's whole L3 challenge of one honest lease (every opening's root and leaf digests, "
        "every block's Freivalds check and replay) over generating the same tokens without a trace; "
        "interleaved, median of 3, one process, one torch thread; checks_only_vs_generation: the "
        "checks without the digests (bench/exact/audits.py's exact_audit_vs_generation)",
        "host": "this project's shared 2-core CPU VM (other processes used it meanwhile); ratios only",
        "command": command(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leases", type=int, default=5, help="leases per cheating agent (3 of them)")
    p.add_argument("--honest-leases", type=int, default=15, help="leases of the honest agent")
    p.add_argument("--skip-1b", action="store_true", help="leave out the ~1B shapes (4 GB each, minutes)")
    p.add_argument("--skip-service", action="store_true", help="only the cost")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "integrity.json")
    args = p.parse_args()
    torch.set_num_threads(1)  # as bench/exact/audits.py: a shared 2-core CPU stalls two threads
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    if not args.skip_service:
        before = os.environ.get("POI_HOME")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["POI_HOME"] = str(Path(tmp) / "home")  # this run's own profile and keys
            try:
                rows = serve_leases(Path(tmp), args.leases, args.honest_leases)
            finally:  # the cost part loads models as the user's home has them
                if before is None:
                    del os.environ["POI_HOME"]
                else:
                    os.environ["POI_HOME"] = before
        caught = result["one_block_cheat_caught_per_challenged_lease"] = caught_per_lease(
            rows, args.leases, args.honest_leases
        )
        print({k: v for k, v in caught.items() if k != "leases"})
    result["exact_all_blocks_vs_generation"] = costs(Registry(), args.skip_1b)
    for value in result.values():
        value["bench_s"] = round(time.perf_counter() - t0)
        value["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_results("integrity.json", result, writes=WRITES, path=args.out)
    print({k: v for k, v in result["exact_all_blocks_vs_generation"].items() if k != "shapes"})
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
