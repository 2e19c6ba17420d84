"""tegrastats / trtexec / nvpmodel parsing on recorded real outputs (tests/data), energy integration,
and the jtop / NVML sampler paths (live paths skipped here when the library or device is missing)."""
from __future__ import annotations

import os
import stat
import sys
from datetime import datetime
from pathlib import Path

import pytest

from heart_onnx.errors import HeartError
from heart_onnx.runtime.env import parse_jetson_clocks_show, parse_nvpmodel_query
from heart_onnx.runtime.power import (
    JtopSampler, NullSampler, NvmlSampler, PowerSample, TegrastatsSampler, auto_sampler, energy_over_windows,
    integrate_energy, parse_tegrastats_line,
)
from heart_onnx.runtime.trtexec import TrtexecRunner, parse_trtexec_output

DATA = Path(__file__).parent / "data"


def lines(name: str) -> list[str]:
    return [ln for ln in (DATA / "tegrastats" / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


# ------------------------------------------------------------------ tegrastats, per JetPack format
def test_jetpack4_nano_pom_rails_without_units():
    a, b = (parse_tegrastats_line(x) for x in lines("jetpack4_nano.txt"))
    assert a.rails_mw == {"POM_5V_IN": 1750.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 366.0}
    assert a.rails_avg_mw["POM_5V_IN"] == 1628.0 and a.rails_avg_mw["POM_5V_CPU"] == 406.0
    assert (a.total_mw, a.total_source) == (1750.0, "POM_5V_IN")
    assert a.timestamp is None and a.ram_used_mb == 1923 and a.gpu_util_pct == 0
    assert a.temps_c["thermal"] == 40.0 and a.temps_c["PMIC"] == 50.0
    assert (b.total_mw, b.rails_mw["POM_5V_CPU"]) == (2003.0, 320.0)
    assert "RAM" not in a.rails_mw and "SWAP" not in a.rails_mw and "IRAM" not in a.rails_mw


def test_jetpack4_xavier_nx_vdd_in_without_units():
    (x,) = (parse_tegrastats_line(s) for s in lines("jetpack4_xavier_nx.txt"))
    assert x.rails_mw == {"VDD_IN": 6140.0, "VDD_CPU_GPU_CV": 2706.0, "VDD_SOC": 1074.0}
    assert x.rails_avg_mw == {"VDD_IN": 5510.0, "VDD_CPU_GPU_CV": 2119.0, "VDD_SOC": 1051.0}
    assert (x.total_mw, x.total_source) == (6140.0, "VDD_IN")


def test_jetpack5_xavier_nx_mw_units_and_timestamp():
    a, b = (parse_tegrastats_line(x) for x in lines("jetpack5_xavier_nx.txt"))
    assert a.timestamp == datetime(2024, 7, 9, 13, 31, 31)
    assert a.rails_mw == {"VDD_IN": 2763.0, "VDD_CPU_GPU_CV": 650.0, "VDD_SOC": 650.0}
    assert a.rails_avg_mw["VDD_IN"] == 2846.0 and a.total_mw == 2763.0
    assert b.timestamp is None and b.total_mw == 5079.0 and b.ram_used_mb == 2690


def test_jetpack5_agx_orin_has_no_input_rail_sums_module_rails():
    (x,) = (parse_tegrastats_line(s) for s in lines("jetpack5_agx_orin.txt"))
    assert x.rails_mw == {"VDD_GPU_SOC": 3150.0, "VDD_CPU_CV": 14312.0, "VIN_SYS_5V0": 4968.0, "VDDQ_VDD2_1V8AO": 1091.0}
    assert x.total_mw == 3150 + 14312 + 4968 + 1091
    assert x.total_source.startswith("sum:")
    assert x.gpu_util_pct == 14 and x.temps_c["tj"] == 77.281
    assert x.timestamp == datetime(2025, 11, 21, 8, 49, 48)


def test_jetpack6_orin_nano_and_agx_orin():
    got = [parse_tegrastats_line(x) for x in lines("jetpack6_orin_nano.txt")]
    assert [g.total_mw for g in got] == [5263.0, 4673.0, 5832.0]
    assert got[2].rails_avg_mw == {"VDD_IN": 5852.0, "VDD_CPU_GPU_CV": 1327.0, "VDD_SOC": 1468.0}
    assert got[0].temps_c["gpu"] == 45.968 and got[0].timestamp == datetime(2025, 5, 5, 6, 5, 39)
    (agx,) = (parse_tegrastats_line(x) for x in lines("jetpack6_agx_orin.txt"))
    assert agx.total_mw == 3193 + 399 + 4306 and agx.timestamp is None


def test_line_without_power_rails():
    x = parse_tegrastats_line("RAM 2048/7772MB (lfb 512x1MB) SWAP 0/3886MB CPU [45%@1907,34%@1907] GR3D_FREQ 0% CPU@52C")
    assert x.rails_mw == {} and x.total_mw is None and x.total_source == "none"


def test_tegrastats_sampler_energy_from_recorded_lines():
    s = TegrastatsSampler(interval_s=1.0)
    recorded = lines("jetpack6_orin_nano.txt")
    for i, ln in enumerate(recorded):  # stamp them 1 s apart, as --interval 1000 would
        s.feed_line(ln, t=float(i))
    s.available = True  # the binary is absent here; the parsing/integration path is what is tested
    # trapezoid by hand over [0, 2]: (5263+4673)/2 + (4673+5832)/2 mW*s
    expect = ((5263 + 4673) / 2 + (4673 + 5832) / 2) / 1e3
    assert s.energy(0.0, 2.0) == pytest.approx(expect)
    assert s.total_source == "VDD_IN"
    assert s.rails_mean_w()["VDD_SOC"] == pytest.approx((1794 + 1339 + 1468) / 3 / 1e3)


# ------------------------------------------------------------------ integration
def test_integrate_constant_and_ramp():
    const = [PowerSample(float(t), 2000.0) for t in range(11)]
    assert integrate_energy(const, 2.5, 7.5) == pytest.approx(2.0 * 5.0)  # 2 W for 5 s
    ramp = [PowerSample(float(t), 1000.0 * t) for t in range(11)]  # P(t) = t W
    # exact integral of t from 1.5 to 4.25 (linear, so the trapezoid with interpolated ends is exact)
    assert integrate_energy(ramp, 1.5, 4.25) == pytest.approx((4.25**2 - 1.5**2) / 2)
    # a window between two samples is interpolated, and windows add up
    assert integrate_energy(ramp, 3.2, 3.4) == pytest.approx((3.4**2 - 3.2**2) / 2)
    assert energy_over_windows(ramp, [(1, 2), (3, 5)]) == pytest.approx((4 - 1) / 2 + (25 - 9) / 2)
    # before the first / after the last sample the power is held
    assert integrate_energy(ramp, 10.0, 12.0) == pytest.approx(10.0 * 2)
    assert integrate_energy([], 0, 1) is None


# ------------------------------------------------------------------ samplers: jtop, NVML, none
def test_jtop_power_dict_conversion():
    # shape documented by jetson-stats (jtop.power): rails with 'power' in mW, 'tot' the board total
    power = {"rail": {"VDD_CPU_GPU_CV": {"online": True, "volt": 5000, "curr": 140, "power": 700, "avg": 690},
                      "VDD_SOC": {"online": True, "volt": 5000, "curr": 360, "power": 1800, "avg": 1790}},
             "tot": {"online": True, "power": 5200, "avg": 5100, "name": "VDD_IN"}}
    s = JtopSampler.sample_from_power(power, t=1.0)
    assert s.total_mw == 5200 and s.rails_mw == {"VDD_CPU_GPU_CV": 700.0, "VDD_SOC": 1800.0}
    no_tot = JtopSampler.sample_from_power({"rail": power["rail"]}, t=2.0)
    assert no_tot.total_mw == 2500.0


def test_jtop_live():
    pytest.importorskip("jtop", reason="jetson-stats (jtop) not installed: not a Jetson")
    import time

    with JtopSampler(0.1) as s:
        time.sleep(0.5)
    assert s.samples and s.samples[-1].total_mw > 0


def test_nvml_live():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed")
    s = NvmlSampler()
    if not s.available:
        pytest.skip(f"no NVML GPU: {s.reason}")
    import time

    with s:
        time.sleep(0.2)
    assert s.samples and s.samples[0].total_mw > 0
    del pynvml


def test_plain_cpu_reports_unavailable(monkeypatch):
    from heart_onnx.runtime import power

    monkeypatch.setattr(power, "is_jetson", lambda: False)
    monkeypatch.setattr(power, "available", lambda m: False)
    s = auto_sampler("auto")
    assert isinstance(s, NullSampler) and not s.available and "no power sensor" in s.reason
    with s:
        pass
    assert s.energy(0, 1) is None
    with pytest.raises(HeartError):
        auto_sampler("bogus")


# ------------------------------------------------------------------ trtexec
def _trt(name: str) -> str:
    return (DATA / "trtexec" / name).read_text()


@pytest.mark.parametrize("name,version,qps,median,p99,p90,gpu_median", [
    ("trt8.4_summary.txt", "8.4.0", 128.422, 7.95883, 8.08612, None, 7.76099),
    ("trt8.5_orin_nano.txt", "8.5.0", 97.8649, 10.7972, 10.9744, 10.9329, 10.1851),
    ("trt8.6_summary.txt", "8.6.0", 912.045, 1.13501, 1.14401, 1.14008, 1.08752),
    ("trt10.3_summary.txt", "10.3.0", 318.007, 3.14062, 3.15039, 3.14587, 3.14062),
])
def test_trtexec_summaries(name, version, qps, median, p99, p90, gpu_median):
    r = parse_trtexec_output(_trt(name))
    assert r["passed"] is True
    assert r["tensorrt_version"].split(".")[:2] == version.split(".")[:2]
    assert r["throughput_qps"] == qps
    assert r["latency_ms"]["median"] == median and r["latency_ms"]["p99"] == p99
    assert r["latency_ms"].get("p90") == p90
    assert r["gpu_compute_ms"]["median"] == gpu_median
    assert r["latency_ms"]["min"] <= r["latency_ms"]["median"] <= r["latency_ms"]["max"]
    assert "enqueue_ms" in r and "h2d_ms" in r and "d2h_ms" in r and r["total_host_walltime_s"] > 0


def test_trtexec_version_digits():
    assert parse_trtexec_output(_trt("trt10.3_summary.txt"))["tensorrt_version"] == "10.3.0"
    assert parse_trtexec_output(_trt("trt8.6_summary.txt"))["tensorrt_version"] == "8.6.0"


def test_trtexec_failure_has_no_summary():
    with pytest.raises(HeartError, match="no performance summary"):
        parse_trtexec_output(_trt("trt8.5_failed.txt"))


def test_trtexec_command_and_subprocess(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    r = TrtexecRunner(model, precision="fp16", engine_path=tmp_path / "m.engine", timing_cache=tmp_path / "t.cache",
                      shapes={"x": (1, 3, 8, 8)}, iterations=20)
    cmd = r.command()
    assert f"--onnx={model}" in cmd and "--fp16" in cmd and "--sparsity=enable" in cmd
    assert f"--saveEngine={tmp_path / 'm.engine'}" in cmd and "--shapes=x:1x3x8x8" in cmd and "--iterations=20" in cmd
    # a stand-in trtexec that prints a recorded TRT 8.6 log: the subprocess path end to end
    fake = tmp_path / "trtexec"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write(open({str(DATA / 'trtexec' / 'trt8.6_summary.txt')!r}).read())\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = TrtexecRunner(model, trtexec=str(fake)).run()
    assert out["throughput_qps"] == 912.045 and out["command"][0] == str(fake)
    bad = tmp_path / "bad"
    bad.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write(open({str(DATA / 'trtexec' / 'trt8.5_failed.txt')!r}).read())\nsys.exit(1)\n")
    bad.chmod(bad.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(HeartError):
        TrtexecRunner(model, trtexec=str(bad)).run()


# ------------------------------------------------------------------ Jetson power mode / clocks
def test_nvpmodel_and_jetson_clocks_parsing():
    # `nvpmodel -q` prints the mode name, then its id (NVIDIA Jetson Linux developer guide, power management)
    assert parse_nvpmodel_query("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert parse_nvpmodel_query("NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n2\n") == {"name": "15W", "id": 2}
    show = (DATA / "jetson" / "jetson_clocks_show_tx1.txt").read_text()
    assert parse_jetson_clocks_show(show) is True
    assert parse_jetson_clocks_show(show.replace("MinFreq=1734000 MaxFreq", "MinFreq=102000 MaxFreq", 1)) is False
    assert parse_jetson_clocks_show("nothing") is None
