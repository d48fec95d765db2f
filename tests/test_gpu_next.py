"""bench/gpu's next GPU run (`run_all.sh next`) on a CPU: the serving loop computes what the model
computes, speculative decoding returns the target's greedy output, next_run.py writes every section
with measured values (and records skips and failures instead of stopping), and collect_traces.py's
serving plan records its workloads. Tiny shapes; no GPU needed (CUDA graphs are not captured here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench/gpu"


def load(name: str) -> ModuleType:
    """A bench/gpu script as a module (not run); bench/gpu on sys.path, as the scripts put it."""
    if str(GPU) not in sys.path:
        sys.path.insert(0, str(GPU))
    key = f"bench_gpu_next_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, GPU / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny(family: str = "llama", seed: int = 0, kv_heads: int = 2):
    ct = load("collect_traces")
    quick = {**ct.LLAMA_IDS, **ct.TINY_LLAMA, "num_key_value_heads": kv_heads}
    return ct.build_model(ct.ModelShape("t", family, "tiny", {}, quick, seed), "cpu", True, torch.float32)


# ---------------------------------------------------------------------------------------------
# the serving loop


@pytest.mark.parametrize("family,kv_heads", [("llama", 4), ("mistral", 2)])  # MHA, and GQA 4/2
def test_static_decoder_computes_the_models_logits_and_greedy_tokens(family, kv_heads):
    serving = load("serving")
    model = tiny(family, kv_heads=kv_heads)
    ids = torch.randint(1000, 32000, (3, 9), generator=torch.Generator().manual_seed(1))
    dec = serving.StaticDecoder(model, batch=3, max_len=24)
    assert not dec.graph_wanted  # no CUDA graph on a CPU
    with torch.no_grad():
        ref = model(ids).logits
        mine = dec.forward(ids, dec.arange[:9], all_logits=True)
    assert torch.allclose(mine, ref, atol=1e-5, rtol=1e-4)
    assert dec.generate(ids, 10) == 10
    hf = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False
    )
    assert torch.equal(dec.seq[:, 9:19], hf[:, 9:])
    with pytest.raises(ValueError, match="exceed"):
        dec.generate(ids, 16)


def test_speculative_decoding_returns_the_targets_greedy_output():
    serving = load("serving")
    target, draft = tiny(seed=0), tiny(seed=5)
    ids = torch.randint(1000, 32000, (1, 8), generator=torch.Generator().manual_seed(2))
    hf = target.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, min_new_tokens=15, do_sample=False
    )[0, 8:].tolist()
    other = serving.Speculative(draft, target, max_len=23, k=3)
    assert other.generate(ids, 15) == hf
    same = serving.Speculative(target, target, max_len=23, k=3)  # every proposal kept
    assert same.generate(ids, 15) == hf
    s = same.stats()
    assert s["accepted"] == s["proposed"] > 0 and s["full_rounds"] == s["rounds"] and s["acceptance"] == 1.0
    assert other.stats()["rounds"] > same.stats()["rounds"]


# ---------------------------------------------------------------------------------------------
# next_run.py


def test_next_run_smoke_writes_every_section_with_measured_values(tmp_path):
    nr = load("next_run")
    out = tmp_path / "gpu_next.json"
    args = ["--device", "cpu", "--quick", "--tokens", "4", "--replay-leases", "1", "--replay-tokens", "20"]
    assert nr.main([*args, "--out", str(out), "--commit", "c0ffee"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_next.json"]  # no temp file left behind
    d = json.loads(out.read_text())
    assert d["format"] == "maxwell-poi-gpu-next/v1" and d["kind"] == "cpu-smoke" and d["complete"] is True
    assert d["commit"] == "c0ffee" and d["env"]["commit"] == "c0ffee" and d["card"].startswith("none")
    assert list(d["sections"]) == ["audit7b", "native_replay", "exact_gpu", "capacity"]  # priority order
    assert all(s["status"] == "done" and s["wall_s"] >= 0 for s in d["sections"].values())
    assert d["errors"] == [] and d["skipped"] == []
    assert d["precision"]["settings"]["cuda_matmul_allow_tf32"] is False

    a = d["audit7b"]
    assert a["model_facts"]["layers"] == 2 and a["model_facts"]["params"] > 0
    assert set(a["cells"]) == {"bf16/b1", "fp32/b1", "bf16/b8", "fp32/b8"}
    for name, c in a["cells"].items():
        assert c["tokens"] == c["new_tokens"] == 4, name
        assert len(c["generate_s"]) == len(c["graphed_generate_s"]) == len(c["audit_s"]) == 1
        assert min(c["generate_s"] + c["graphed_generate_s"] + c["audit_s"]) > 0
        assert c["audit_speedup"] > 0 and c["graphed_audit_speedup"] > 0
        assert c["audit_speedup_per_lease"] == pytest.approx(c["audit_speedup"] / c["batch"], rel=0.02)
        assert c["verdicts"][0]["verdict"] == "pass", c["verdicts"]  # honest, same weights
        assert c["generation_loop_graphed"] is False and c["warmup"]["graph_error"] is None
        assert bool(c["audit_claimed_s"]) == (c["precision"] == "bf16")

    # the decode replay reproduces honest bf16 provers exactly on one machine (the CPU here), and
    # not int8-rounded weights computing in bf16
    r = d["native_replay"]
    m = r["models"]["gpt2-micro"]
    assert set(m["runs"]) == {"honest-bf16", "honest-speculative", "int8-weights-bf16-compute"}
    assert m["params"] > 0 and m["warmup_s"] > 0
    for variant, s in m["by_variant"].items():
        assert s["runs"] == 1 and len(m["runs"][variant]) == 1, variant
        run = m["runs"][variant][0]
        assert run["tokens"] == 20 and run["temperature"] == 0.8
        assert min(run["generate_s"], run["replay_s"], run["prefill_s"]) > 0
        assert s["replay_over_prefill"] > 0 and s["generate_over_replay"] > 0
        assert s["declared_schedule"] == (variant == "honest-speculative")
    for variant in ("honest-bf16", "honest-speculative"):
        replay = m["by_variant"][variant]["replay"]
        assert replay["runs_all_chunks_close"] == 1 and replay["worst_close"]["min"] == 1.0, variant
        assert replay["worst_median_rel"]["max"] == 0 and replay["max_token_gap"]["max"] == 0
    cheat = m["by_variant"]["int8-weights-bf16-compute"]["replay"]
    assert cheat["runs_all_chunks_close"] == 0 and cheat["worst_close"]["max"] < 0.9
    assert "1/1 runs every chunk" in r["summary"]["gpt2-micro"]["honest-bf16"]

    e = d["exact_gpu"]
    tol = e["tolerance_fp32"]
    cells = e["cells"]
    assert set(cells) == {f"gpt2-micro/{p}/{k}" for p in ("fp32", "bf16") for k in ("honest", "cheat")}
    honest = cells["gpt2-micro/fp32/honest"]
    assert honest["verdict"] == "pass" and 0 <= honest["worst_residual"] < tol
    assert set(honest["per_block"]) == {"0", "1"} and honest["positions"] > 8
    cheat = cells["gpt2-micro/fp32/cheat"]
    assert cheat["caught"] and cheat["caught_at_cheat_block"] and cheat["cheat_block"] == 1
    assert cheat["cheat_block_residual"] > tol > cheat["other_blocks_worst_residual"]
    assert cheat["cheat_weights_changed_fraction"] == 1.0
    for kind in ("honest", "cheat"):  # bf16: residuals measured, also against the rounded weights
        b = cells[f"gpt2-micro/bf16/{kind}"]
        assert b["worst_residual"] > 0 and b["vs_bf16_rounded_weights"]["worst_residual"] > 0

    c = d["capacity"]
    assert c["count"] == 8 and c["matrices_bytes"] == 8 * 128 * 128 * 2
    assert len(c["pass_s"]) == 2 and min(c["pass_s"]) > 0 and c["pass_s_median"] > 0
    assert c["digests_equal"] is True and len(c["digests"]) == 3 and len(c["digests"][0]) == 64
    assert c["digest_after_regeneration_equal"] is True and c["regenerate_all_s"] >= 0
    assert "CPU" in c["pcie_note"] and c["pcie"]["h2d_pageable_gb_s"] > 0  # host copies here
    derived = c["derived"]
    assert derived["h2d_basis"] == "h2d_pageable_gb_s" and derived["relay_upload_all_s"] > 0
    half = derived["half_memory_card_reupload_per_pass_s"]
    assert half == pytest.approx(derived["relay_upload_all_s"] / 2, rel=1e-3)
    assert derived["half_memory_card_slowdown_with_reupload"] >= 1


def test_next_run_records_skips_and_failures_and_goes_on(tmp_path, monkeypatch):
    nr = load("next_run")

    def broken(run, args):
        raise RuntimeError("injected: capacity")

    monkeypatch.setattr(nr, "capacity", broken)
    out = tmp_path / "r.json"
    args = ["--device", "cpu", "--quick", "--sections", "audit7b,capacity", "--out", str(out)]
    assert nr.main([*args, "--section-budgets", "audit7b=0"]) == 1
    d = json.loads(out.read_text())
    assert d["sections"]["audit7b"]["status"] == "done" and d["sections"]["capacity"]["status"] == "failed"
    assert d["skipped"][0]["section"] == "audit7b" and "budget" in d["skipped"][0]["reason"]
    assert [(x["section"], x["trial"]) for x in d["errors"]] == [("capacity", None)]
    assert "injected: capacity" in d["errors"][0]["traceback"] and d["complete"] is False


def test_next_run_section_budgets_fit_run_alls_share_and_an_unfunded_replay_is_listed(tmp_path):
    nr = load("next_run")
    assert list(nr.BUDGETS) == list(nr.SECTIONS)
    main_s = re.search(r"NEXT_MAIN=\$\{POI_NEXT_MAIN_S:-(\d+)\}", (GPU / "run_all.sh").read_text())
    assert main_s and sum(nr.BUDGETS.values()) <= int(main_s.group(1)) - 10  # its last trial may overrun
    with pytest.raises(SystemExit):
        nr.parse_args(["--replay-models", "gpt2-large"])  # no draft named for it
    out = tmp_path / "r.json"
    args = ["--device", "cpu", "--quick", "--sections", "native_replay", "--out", str(out)]
    assert nr.main([*args, "--section-budgets", "native_replay=0"]) == 1
    d = json.loads(out.read_text())
    assert d["sections"]["native_replay"]["status"] == "done" and d["errors"] == []
    assert [x["trial"] for x in d["skipped"]] == ["gpt2-micro setup"]
    assert d["native_replay"]["summary"] == {"gpt2-micro": {}}


def test_run_all_knows_the_next_part():
    env = dict(os.environ, POI_SMOKE="1", PYTHON=sys.executable)
    r = subprocess.run(
        ["bash", str(GPU / "run_all.sh"), "--help"], capture_output=True, text=True, timeout=30, env=env
    )
    assert r.returncode == 0 and "run_all.sh next" in r.stdout and "POI_NEXT_BUDGET_S" in r.stdout


# ---------------------------------------------------------------------------------------------
# collect_traces.py --plan serving


def test_collect_traces_serving_plan_records_the_serving_loop_and_a_speculative_pair(tmp_path):
    out, pack = tmp_path / "traces", tmp_path / "ret" / "serving_traces.tar.gz"
    only = "^(idle|serve-llama-1b-b1|serve-mistral-7b-b32|spec-.*)$"
    cmd = [sys.executable, str(GPU / "collect_traces.py"), "--device", "cpu", "--quick", "--plan", "serving"]
    cmd += ["--seconds", "0.6", "--only", only, "--out", str(out), "--pack", str(pack), "--commit", "c0ffee"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OUT", None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["config"]["plan"] == "serving" and index["kind"] == "cpu-smoke" and index["errors"] == []
    recs = {x["key"]: x for x in index["recordings"]}
    assert set(recs) == {"idle", "serve-llama-1b-b1", "serve-mistral-7b-b32", "spec-llama-1b-llama2-7b-b1"}
    for key in ("serve-llama-1b-b1", "serve-mistral-7b-b32"):
        w = recs[key]["work"]
        assert "static KV cache" in w["loop"] and w["generate_calls"] >= 1 and w["new_tokens"] > 0
        assert w["flops_est"] > w["prefill_flops_est"] > 0 and w["tokens_per_s"] > 0
    assert recs["serve-mistral-7b-b32"]["work"]["batch"] == 32
    spec = recs["spec-llama-1b-llama2-7b-b1"]["work"]
    assert spec["rounds"] >= 1 and spec["k"] == 4 and spec["acceptance"] is not None
    assert spec["flops_est"] == spec["draft_flops_est"] + spec["target_flops_est"] > 0
    with tarfile.open(pack) as tar:
        names = set(tar.getnames())
    assert "traces/index.json" in names and len(names) == 1 + 4  # one process trace per recording
    assert (pack.parent / "serving_traces_index.json").exists()
