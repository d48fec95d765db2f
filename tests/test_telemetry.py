"""Telemetry layer: NVML through a fake module (no GPU here), process accounting on real child
processes, RAPL on a fake sysfs tree, trace files, replay and the Observer."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from simulated import SimulatedSource

from maxwell_poi.observer.telemetry import (
    TRACE_FORMAT,
    Capability,
    Measurement,
    NvmlSource,
    Observer,
    ProcessSource,
    RaplSource,
    ReplaySource,
    TelemetrySource,
    TrustLevel,
    default_sources,
    load_trace,
    save_trace,
)
from maxwell_poi.observer.telemetry.nvml import GPM_METRICS

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# a pynvml stand-in: the functions NvmlSource calls, returning recorded values


class FakeNVMLError(Exception):
    pass


class FakeGpmMetricsGet:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(32)]


class FakeNvml:
    NVMLError = FakeNVMLError
    c_nvmlGpmMetricsGet_t = FakeGpmMetricsGet
    # the constants NvmlSource reads from its nvml module, with nvml.h's values (checked against the
    # installed pynvml below); the fake's functions refuse any other argument
    NVML_SUCCESS = 0
    NVML_FI_DEV_POWER_AVERAGE = 185
    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_VALUE_TYPE_DOUBLE = 0
    NVML_VALUE_TYPE_UNSIGNED_INT = 1
    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_PCIE_UTIL_TX_BYTES = 0
    NVML_PCIE_UTIL_RX_BYTES = 1
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_INTEGER_UTIL = 4
    NVML_GPM_METRIC_FP16_UTIL = 13
    NVML_GPM_METRIC_FP32_UTIL = 12
    NVML_GPM_METRIC_DRAM_BW_UTIL = 10

    def __init__(
        self,
        power_mw: list[int] | None = None,
        energy_mj: list[int] | None = None,
        gpm: bool = True,
        broken: set[str] | None = None,
        missing: set[str] | None = None,
        gpm_values: dict[int, float] | None = None,
        field_errors: dict[int, int] | None = None,
    ) -> None:
        self.power_mw = power_mw or [300_000]
        self.energy_mj = list(energy_mj or [1_000_000])
        self.gpm = gpm
        self.broken = broken or set()
        self.missing = missing or set()
        self.gpm_values = gpm_values or {5: 62.5, 4: 1.5, 13: 3.0, 12: 7.0, 10: 40.0}
        self.field_errors = field_errors or {}
        self.calls: dict[str, int] = {}
        self.shutdown = 0

    def __getattribute__(self, name: str) -> Any:
        if name.startswith(("nvml", "NVML_")) and name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        if name.startswith("nvml"):
            calls = object.__getattribute__(self, "calls")
            calls[name] = calls.get(name, 0) + 1
            if name in object.__getattribute__(self, "broken"):

                def fail(*args: Any) -> Any:
                    raise FakeNVMLError("Not Supported")

                return fail
        return object.__getattribute__(self, name)

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdown += 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"handle{i}"

    def nvmlDeviceGetName(self, h: str) -> str:
        return "Fake H100"

    def _power(self) -> int:
        n = self.calls.get("nvmlDeviceGetFieldValues", 0) + self.calls.get("nvmlDeviceGetPowerUsage", 0)
        return self.power_mw[n % len(self.power_mw)]

    def nvmlDeviceGetFieldValues(self, h: str, ids: list[int]) -> list[SimpleNamespace]:
        assert set(ids) <= {self.NVML_FI_DEV_POWER_AVERAGE, self.NVML_FI_DEV_POWER_INSTANT}, ids
        p = self._power()
        return [
            SimpleNamespace(
                fieldId=i,
                nvmlReturn=self.field_errors.get(i, self.NVML_SUCCESS),
                valueType=self.NVML_VALUE_TYPE_UNSIGNED_INT,
                value=SimpleNamespace(uiVal=p),
            )
            for i in ids
        ]

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        return self._power()

    def nvmlDeviceGetUtilizationRates(self, h: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=97, memory=41)

    def nvmlDeviceGetClockInfo(self, h: str, kind: int) -> int:
        assert kind == self.NVML_CLOCK_SM, kind
        return 1980

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU, sensor
        return 55

    def nvmlDeviceGetPcieThroughput(self, h: str, counter: int) -> int:
        return {self.NVML_PCIE_UTIL_TX_BYTES: 1200, self.NVML_PCIE_UTIL_RX_BYTES: 3400}[counter]

    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int:
        return self.energy_mj.pop(0) if len(self.energy_mj) > 1 else self.energy_mj[0]

    def nvmlGpmQueryDeviceSupport(self, h: str) -> SimpleNamespace:
        return SimpleNamespace(isSupportedDevice=int(self.gpm))

    def nvmlGpmSampleAlloc(self) -> object:
        return object()

    def nvmlGpmSampleFree(self, s: object) -> None:
        pass

    def nvmlGpmSampleGet(self, h: str, s: object) -> object:
        return s

    def nvmlGpmMetricsGet(self, mg: FakeGpmMetricsGet) -> FakeGpmMetricsGet:
        assert mg.version == self.NVML_GPM_METRICS_GET_VERSION, mg.version
        for m in mg.metrics[: mg.numMetrics]:
            if m.metricId in self.gpm_values:
                m.value = self.gpm_values[m.metricId]
            else:
                m.nvmlReturn = 3
        return mg


def caps(src: Any) -> dict[str, Capability]:
    return {c.name: c for c in src.capabilities()}


def test_nvml_probes_capabilities_and_reads_series() -> None:
    fake = FakeNvml(power_mw=[300_000, 320_000], energy_mj=[1_000_000, 1_000_000, 1_250_000])
    src = NvmlSource(nvml=fake, hz=50, gpm_min_interval_s=0.0)
    c = caps(src)
    assert all(c[n].available for n in ("power_w", "power_avg_w", "gpu_util", "tensor_util", "energy_j"))
    assert "186" in c["power_w"].reason
    assert src.name == "nvml:0" and src.device == "gpu0 Fake H100" and src.trust == TrustLevel.HOST
    assert isinstance(src, TelemetrySource)

    src.begin_window()
    time.sleep(0.2)
    m = src.end_window()
    assert m.trust == TrustLevel.HOST and m.source == "nvml:0"
    assert m.totals["energy_j"] == pytest.approx(250.0)  # counter delta, mJ -> J
    assert set(m.series) >= {"power_w", "power_avg_w", "gpu_util", "mem_util", "sm_clock_mhz", "temp_c"}
    assert set(m.series) >= {"pcie_tx_kbs", "pcie_rx_kbs", *GPM_METRICS}
    assert m.t[0] == 0.0 and len(m.t) >= 3
    assert set(np.unique(m.series["power_w"])) <= {300.0, 320.0}
    tensor = m.series["tensor_util"]
    assert math.isnan(tensor[0])  # no GPM interval yet at t=0
    assert np.nanmax(tensor) == pytest.approx(62.5)
    s = m.summary()
    assert s["gpu_util_mean"] == 97 and s["tensor_util_max"] == pytest.approx(62.5)
    assert s["samples"] == len(m.t) and s["energy_j"] == pytest.approx(250.0)
    lo, hi = 300.0 * (m.t[-1] - m.t[0]), 320.0 * (m.t[-1] - m.t[0])
    assert lo - 1e-9 <= m.totals["energy_j_integrated"] <= hi + 1e-9
    assert m.totals["sampler_cpu_s"] >= 0.0 and m.totals["sample_errors"] == 0
    src.close()
    assert fake.shutdown == 1


def test_nvml_without_gpm_reports_why() -> None:
    src = NvmlSource(nvml=FakeNvml(gpm=False), hz=50)
    c = caps(src)
    for n in GPM_METRICS:
        assert not c[n].available and "not supported" in c[n].reason
    assert c["power_w"].available
    src.begin_window()
    m = src.end_window()
    assert not set(GPM_METRICS) & set(m.series)  # never faked with zeros
    assert not m.capability("tensor_util").available


def test_nvml_missing_functions_and_errors_mark_capabilities() -> None:
    fake = FakeNvml(
        broken={"nvmlDeviceGetPcieThroughput"},
        missing={"nvmlGpmQueryDeviceSupport", "nvmlDeviceGetTotalEnergyConsumption"},
        gpm_values={5: 50.0, 10: 20.0},  # the driver lacks INT/FP16/FP32 metrics
    )
    src = NvmlSource(nvml=fake, hz=50)
    c = caps(src)
    assert not c["pcie_tx_kbs"].available and "Not Supported" in c["pcie_tx_kbs"].reason
    assert not c["energy_j"].available and "AttributeError" in c["energy_j"].reason
    assert not c["tensor_util"].available and "nvmlGpmQueryDeviceSupport" in c["tensor_util"].reason
    assert c["gpu_util"].available
    src.begin_window()
    time.sleep(0.05)
    m = src.end_window()
    assert "pcie_tx_kbs" not in m.series and "energy_j" not in m.totals
    assert "energy_j_integrated" in m.totals  # still from sampled power

    # GPM present but some metrics unsupported by this driver
    partial = NvmlSource(nvml=FakeNvml(gpm_values={5: 50.0, 10: 20.0}), hz=50)
    pc = caps(partial)
    assert pc["tensor_util"].available and pc["dram_bw_util"].available
    assert not pc["int_util"].available and "returned an NVML error" in pc["int_util"].reason


def test_nvml_power_field_missing_falls_back_to_power_usage() -> None:
    src = NvmlSource(nvml=FakeNvml(field_errors={186: 3, 185: 3}), hz=50)
    c = caps(src)
    assert c["power_w"].available and "nvmlDeviceGetPowerUsage" in c["power_w"].reason
    assert not c["power_avg_w"].available
    src.begin_window()
    m = src.end_window()
    assert np.all(m.series["power_w"] == 300.0) and "power_avg_w" not in m.series


def test_nvml_error_during_window_is_nan_not_crash() -> None:
    fake = FakeNvml()
    src = NvmlSource(nvml=fake, hz=50)
    fake.broken.add("nvmlDeviceGetTemperature")  # worked at probe time, fails from now on
    src.begin_window()
    time.sleep(0.05)
    m = src.end_window()
    assert np.all(np.isnan(m.series["temp_c"])) and m.totals["sample_errors"] >= 1
    assert np.all(m.series["gpu_util"] == 97)


def test_nvml_init_failure_makes_source_unavailable() -> None:
    fake = FakeNvml(broken={"nvmlInit"})
    src = NvmlSource(nvml=fake)
    assert not src.available
    assert all(not c.available and "Not Supported" in c.reason for c in caps(src).values())


def test_nvml_real_library_without_gpu_does_not_crash() -> None:
    src = NvmlSource()  # real pynvml; on a host without a driver everything is unavailable with a reason
    assert all(c.reason for c in src.capabilities() if not c.available)
    src.close()


def test_fake_nvml_constants_match_the_installed_pynvml() -> None:
    pynvml = pytest.importorskip("pynvml")
    consts = {n: v for n, v in vars(FakeNvml).items() if n.startswith("NVML_")}
    assert consts == {n: getattr(pynvml, n) for n in consts}


def test_nvml_constants_come_from_the_binding() -> None:
    # a binding without a constant (an older nvidia-ml-py) makes that capability unavailable, by name
    fake = FakeNvml(missing={"NVML_CLOCK_SM", "NVML_GPM_METRIC_FP16_UTIL", "NVML_FI_DEV_POWER_AVERAGE"})
    src = NvmlSource(nvml=fake, hz=50, gpm_min_interval_s=0.0)
    c = caps(src)
    assert not c["sm_clock_mhz"].available and "NVML_CLOCK_SM" in c["sm_clock_mhz"].reason
    assert not c["fp16_util"].available and "NVML_GPM_METRIC_FP16_UTIL" in c["fp16_util"].reason
    assert not c["power_avg_w"].available and "NVML_FI_DEV_POWER_AVERAGE" in c["power_avg_w"].reason
    assert c["power_w"].available and c["tensor_util"].available and c["temp_c"].available
    src.begin_window()
    time.sleep(0.05)
    m = src.end_window()
    assert "sm_clock_mhz" not in m.series and "fp16_util" not in m.series and "power_avg_w" not in m.series
    assert m.totals["sample_errors"] == 0


def test_nvml_reads_pcie_at_pcie_hz_and_power_every_tick() -> None:
    fake = FakeNvml()
    src = NvmlSource(nvml=fake, hz=50, pcie_hz=4.0, gpm_min_interval_s=0.0)
    assert "pcie_hz" in (NvmlSource.__doc__ or "")
    fake.calls.clear()
    src.begin_window()
    time.sleep(1.0)
    m = src.end_window()
    # PCIe reads are at least 1/pcie_hz apart and all fall inside the window
    limit = m.duration_s * src.pcie_hz + 1
    assert 2 <= fake.calls["nvmlDeviceGetPcieThroughput"] / 2 <= limit
    power, tx, rx = m.series["power_w"], m.series["pcie_tx_kbs"], m.series["pcie_rx_kbs"]
    assert np.all(np.isfinite(power))  # power on every tick
    assert fake.calls["nvmlDeviceGetFieldValues"] == len(m.t)
    assert len(m.t) > 3 * limit  # so the two rates are told apart
    read = np.isfinite(tx)
    assert np.array_equal(read, np.isfinite(rx)) and read[0]  # t=0 carries PCIe
    assert 2 <= read.sum() <= limit
    assert np.all(tx[read] == 1200) and np.all(rx[read] == 3400)
    assert np.all(np.diff(m.t[read]) > 0.8 / src.pcie_hz)  # sample times jitter a little around reads
    with pytest.raises(ValueError, match="pcie_hz"):
        NvmlSource(nvml=FakeNvml(), pcie_hz=0)


# --------------------------------------------------------------------------------------------
# process accounting on real processes

BURN = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass"
SLEEP = "import time; time.sleep({s})"
PARENT = "import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_process_source_tells_burning_from_sleeping() -> None:
    burner, sleeper = _spawn(BURN.format(s=3)), _spawn(SLEEP.format(s=3))
    try:
        time.sleep(0.2)  # let interpreter start-up pass
        obs_b, obs_s = ProcessSource(hz=10), ProcessSource(hz=10)
        obs_b.begin_window(burner.pid)
        obs_s.begin_window(sleeper.pid)
        time.sleep(1.0)
        mb, ms = obs_b.end_window(), obs_s.end_window()
    finally:
        burner.kill()
        sleeper.kill()
        burner.wait()
        sleeper.wait()
    # loose bounds: other work on this machine may steal the burner's core; the gap stays large
    assert mb.totals["cpu_s"] > 0.3, mb.totals
    assert ms.totals["cpu_s"] < 0.1, ms.totals
    assert np.nanmean(mb.series["cpu_util"]) > 0.3
    assert np.nanmean(ms.series["cpu_util"]) < 0.1
    assert mb.totals["peak_rss_mb"] > 1 and mb.trust == TrustLevel.HOST
    assert f"pid {burner.pid}" in mb.device
    assert mb.totals["sampler_cpu_s"] < 0.5 * mb.duration_s  # generous: no timing assertions


def test_process_source_counts_children() -> None:
    parent = _spawn(PARENT.format(child=BURN.format(s=3)))
    try:
        time.sleep(0.3)
        src = ProcessSource(hz=10)
        src.begin_window(parent.pid)
        time.sleep(1.0)
        m = src.end_window()
    finally:
        for c in __import__("psutil").Process(parent.pid).children(recursive=True):
            c.kill()
        parent.kill()
        parent.wait()
    assert m.totals["cpu_s"] > 0.3, m.totals  # the parent only waits; the CPU is its child's


def test_process_source_rejects_missing_pid() -> None:
    import psutil

    src = ProcessSource()
    with pytest.raises(psutil.NoSuchProcess):
        src.begin_window(2**22 + 12345)


# --------------------------------------------------------------------------------------------
# RAPL on a fake sysfs


def _zone(root: Path, name: str, label: str, uj: int, rng: int = 262_143_328_850) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{uj}\n")
    (z / "max_energy_range_uj").write_text(f"{rng}\n")
    return z


def test_rapl_handles_wraparound_and_skips_subzones(tmp_path: Path) -> None:
    rng = 1_000_000_000
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", rng - 1_000, rng)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5)  # inside the package: not summed
    _zone(tmp_path, "intel-rapl:1", "psys", 7)  # whole platform: not summed
    src = RaplSource(hz=20, root=tmp_path)
    c = caps(src)
    assert c["cpu_energy_j"].available and "intel-rapl:0/package-0" in c["cpu_energy_j"].reason
    assert "psys" in c["cpu_energy_j"].reason
    src.begin_window()
    (pkg / "energy_uj").write_text("500\n")  # wrapped: 1000 uJ to the top, then 500
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999\n")
    time.sleep(0.15)
    m = src.end_window()
    assert m.totals["cpu_energy_j"] == pytest.approx(1_500e-6)
    assert np.all(m.series["cpu_power_w"] >= 0) and np.nanmax(m.series["cpu_power_w"]) > 0


def test_rapl_absent_or_denied_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = RaplSource(root=tmp_path / "nope")
    assert not gone.available and "no powercap" in caps(gone)["cpu_power_w"].reason
    _zone(tmp_path, "intel-rapl:0", "package-0", 10)

    def denied(self: RaplSource, path: Path) -> float:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(RaplSource, "_read_uj", denied)
    src = RaplSource(root=tmp_path)
    assert not src.available and "permission denied" in caps(src)["cpu_energy_j"].reason


# --------------------------------------------------------------------------------------------
# traces, replay, simulation, observer


def _sim(label: str) -> Measurement:
    sim = SimulatedSource({"power_w": (300.0, 20.0), "gpu_util": 90.0}, duration_s=2.0, seed=3)
    sim.begin_window()
    m = sim.end_window()
    t = m.t.copy()
    series = {k: v.copy() for k, v in m.series.items()}
    series["gpu_util"][3] = np.nan  # a failed read survives the round trip as NaN
    return replace(m, label=label, t=t, series=series)


@pytest.mark.parametrize("name", ["trace.json", "trace.json.gz"])
def test_trace_round_trip(tmp_path: Path, name: str) -> None:
    m = _sim("gpt2-small inference")
    path = save_trace(m, tmp_path / name)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = load_trace(path)
    assert (back.source, back.trust, back.device, back.label) == (m.source, m.trust, m.device, m.label)
    assert back.started_at == m.started_at and back.duration_s == m.duration_s
    np.testing.assert_allclose(back.t, m.t, rtol=1e-5)
    np.testing.assert_allclose(back.series["power_w"], m.series["power_w"], rtol=1e-3)
    assert math.isnan(back.series["gpu_util"][3])
    assert back.totals == pytest.approx(m.totals)
    assert back.capabilities == m.capabilities
    assert back.summary()["power_w_mean"] == pytest.approx(m.summary()["power_w_mean"], rel=1e-3)


def test_trace_refuses_other_format(tmp_path: Path) -> None:
    d = _sim("x").to_dict()
    d["format"] = "someone-else/v9"
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(gzip.compress(json.dumps(d).encode()))
    with pytest.raises(ValueError, match=r"expected 'maxwell-poi-trace/v1', got 'someone-else/v9'"):
        load_trace(bad)
    del d["format"]
    with pytest.raises(ValueError, match="got None"):
        Measurement.from_dict(d)
    d["format"] = TRACE_FORMAT
    del d["totals"]
    with pytest.raises(ValueError, match="missing field 'totals'"):
        Measurement.from_dict(d)


def test_measurement_checks_shapes() -> None:
    with pytest.raises(ValueError, match="expected 3 samples"):
        Measurement("s", TrustLevel.HOST, "d", 0.0, 1.0, np.zeros(3), {"x": np.zeros(2)}, {}, ())


def test_replay_source_feeds_recorded_trace(tmp_path: Path) -> None:
    fake = FakeNvml(energy_mj=[0, 0, 5_000])
    live = NvmlSource(nvml=fake, hz=50, gpm_min_interval_s=0.0)
    live.begin_window()
    time.sleep(0.05)
    recorded = replace(live.end_window(), label="fake-gpu run")
    path = save_trace(recorded, tmp_path / "nvml.json.gz")

    rep = ReplaySource(path)
    assert rep.name == "nvml:0" and rep.trust == TrustLevel.RECORDED
    assert caps(rep)["tensor_util"].available
    obs = Observer([rep])
    obs.begin_window(pid=123)
    got = obs.end_window()["nvml:0"]
    assert got.trust == TrustLevel.RECORDED and got.label == "fake-gpu run"
    assert got.totals["energy_j"] == pytest.approx(5.0)
    np.testing.assert_allclose(got.series["gpu_util"], recorded.series["gpu_util"])

    # a simulated trace stays simulated when replayed
    sim_path = save_trace(_sim("synthetic"), tmp_path / "sim.json")
    assert ReplaySource(sim_path).trust == TrustLevel.SIMULATED


def test_simulated_source_is_labelled() -> None:
    with pytest.raises(ValueError, match="simulated"):
        SimulatedSource({"power_w": 1.0}, name="nvml:0")
    sim = SimulatedSource({"power_w": 250.0}, duration_s=4.0, hz=10)
    assert "simulated" in sim.name and sim.trust == TrustLevel.SIMULATED
    assert "never feeds a reported figure" in (SimulatedSource.__doc__ or "")
    sim.begin_window()
    m = sim.end_window()
    assert m.trust == TrustLevel.SIMULATED and len(m.t) == 41
    assert m.totals["energy_j"] == pytest.approx(1000.0)


def test_observer_runs_sources_together(tmp_path: Path) -> None:
    nv = NvmlSource(nvml=FakeNvml(), hz=50)
    obs = Observer([ProcessSource(hz=20), nv, SimulatedSource({"power_w": 100.0}, duration_s=1.0)])
    assert set(obs.capabilities()) == {"process", "nvml:0", "simulated"}
    obs.begin_window()
    sum(i * i for i in range(200_000))
    out = obs.end_window()
    assert set(out) == {"process", "nvml:0", "simulated"}
    assert out["process"].totals["cpu_s"] >= 0 and "power_w" in out["nvml:0"].series
    with pytest.raises(RuntimeError):
        obs.end_window()
    with pytest.raises(ValueError, match="unique"):
        Observer([ProcessSource(), ProcessSource()])


def test_default_sources_here() -> None:
    names = [s.name for s in default_sources()]
    assert names[0] == "process"  # NVML / RAPL only where this host can read them


def _bench_module(rel: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sampling_overhead_report_shape() -> None:
    bench = _bench_module("bench/signals/sampling_overhead.py", "bench_sampling_overhead")
    r = bench.measure_sampling_overhead(seconds=0.3, hz=10)
    assert set(r) >= {"hz", "wall_s", "sampler_cpu_s", "sampling_overhead_cpu_fraction"}
    assert r["sampling_overhead_cpu_fraction"] == pytest.approx(r["sampler_cpu_s"] / r["wall_s"])


STANDALONE = """
import sys
import importlib.util
spec = importlib.util.spec_from_file_location("collect_traces_under_test", sys.argv[1])
ct = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ct  # its dataclasses look their module up by name
spec.loader.exec_module(ct)
tel = ct.load_telemetry_standalone("other_name_telemetry")
assert tel.__name__ == "other_name_telemetry" and "other_name_telemetry.nvml" in sys.modules
leaked = sorted(k for k in sys.modules if k.startswith("maxwell_poi") or k == "torch")
assert not leaked, leaked
src = tel.NvmlSource(nvml=None)  # real pynvml: usable whether or not this host has a GPU
src.close()
proc = tel.ProcessSource(hz=20)
proc.begin_window()
m = proc.end_window()
out = tel.save_trace(m, sys.argv[2])
assert tel.load_trace(out).source == "process"
print("standalone ok", tel.TRACE_FORMAT)
"""


def test_collect_traces_loads_the_package_without_maxwell_poi(tmp_path: Path) -> None:
    """bench/gpu/collect_traces.py's fallback loader, as a GPU machine without torch would run it."""
    script = ROOT / "bench/gpu/collect_traces.py"
    r = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(script), str(tmp_path / "t.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert f"standalone ok {TRACE_FORMAT}" in r.stdout
