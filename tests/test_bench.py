"""The benchmarks' own arithmetic (their measurements are not tests: bench/ prints them)."""
import importlib.util
import os

import pytest

from conftest import REPO
from octconv_exp.backends.native import compile_decision


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(speeds, flops=0.5):
    """bench_end_to_end rows for one case from images/s per mode."""
    return [{"case": "seed_exp4_b64", "conv": mode, "flops_ratio": 1.0 if mode == "vanilla" else flops,
             "time_vs_vanilla": speeds["vanilla"] / v, "time_vs_octave": speeds["octave"] / v}
            for mode, v in speeds.items()]


def test_end_to_end_targets_use_time_ratios():
    e2e = _load("bench_end_to_end")
    # multi-octave 1000 img/s against octave 880: 0.88 of its time; 500 img/s vanilla: 0.5
    # of vanilla's time against a FLOPs ratio of 0.5 -> 1.0.
    targets = {t["what"]: t for t in e2e.target_values(
        _rows({"vanilla": 500.0, "octave": 880.0, "multi-octave": 1000.0}))}
    t = targets["multi-octave time / octave time"]
    assert t["value"] == pytest.approx(0.88) and t["met"]
    f = targets["multi-octave time / vanilla time, over its FLOPs ratio"]
    assert f["value"] == pytest.approx(1.0) and f["met"]
    slow = {t["what"]: t for t in e2e.target_values(
        _rows({"vanilla": 500.0, "octave": 1000.0, "multi-octave": 950.0}))}
    assert not slow["multi-octave time / octave time"]["met"]
    assert not any(t["case"] == "resnet20_b128" for t in slow.values())  # case not run


def test_interleaved_runs_rotate_their_order_every_round():
    """bench_end_to_end and bench_malloc run their processes in this order: every job once a
    round, the first job of each round the next one along."""
    shared = _load("_shared")
    order = list(shared.rotating_rounds(["a", "b", "c"], 4))
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"),
                     (2, "c"), (2, "a"), (2, "b"), (3, "a"), (3, "b"), (3, "c")]


def test_cuda_bench_compile_entry_feeds_speed_compile_auto():
    cuda = _load("bench_cuda")
    rows = [{"model": "seed_exp4_b64", "conv": "octave", "compile_warmup_s": 20.0,
             "compiled_vs_eager": 0.7},
            {"model": "seed_exp1_b8", "conv": "octave", "compile_warmup_s": 30.04,
             "compiled_vs_eager": 0.8},
            {"model": "resnet20_b128", "conv": "vanilla", "compile_warmup_s": 40.0,
             "compiled_vs_eager": 1.2}]
    entry = cuda.compile_entry(rows)
    # The least favourable over the seed CNN's two sizes, keyed as metrics.json names models.
    assert entry == {"seed_cnn/octave": (30.0, 0.8), "resnet_cifar-20/vanilla": (40.0, 1.2)}
    measured = {"cuda": entry}
    on, why = compile_decision("auto", "cuda", model="seed_cnn", conv="octave", steps_left=10**4,
                               eager_step_s=0.05, measured=measured, torch_version="2.5.0")
    assert on is True  # 10^4 x 50 ms x 20 % = 100 s > 30 s
    on, _ = compile_decision("auto", "cuda", model="resnet_cifar-20", conv="vanilla",
                             steps_left=10**6, eager_step_s=1.0, measured=measured,
                             torch_version="2.5.0")
    assert on is False


def _quick_run(name, tmp_path, timeout):
    """bench/<name>.py --quick in its own process: the module and the results file it wrote."""
    import json
    import subprocess
    import sys

    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", name + ".py"),
                           "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return _load(name), json.loads(out.read_text())


def test_batchnorm_bench_reports_both_kernels_and_the_products_choice(tmp_path):
    from octconv_exp.models import batchnorm
    bench, results = _quick_run("bench_batchnorm", tmp_path, timeout=300)
    rows = results["rows"]
    assert [r["tensor"] for r in rows] == [s[0] for s in bench.SHAPES]
    by_channels = {r["shape"][1]: r for r in rows}
    # torch's kernel stays on 16 or 32 channels; ResNet-20's 8-channel stage-1 tensors not
    assert by_channels[16]["uses"] == by_channels[32]["uses"] == "torch"
    assert rows[0]["uses"] == "wide view"
    for r in rows:
        assert r["torch_ms"] > 0 and r["wide_ms"] > 0
        assert r["wide_over_torch"] == pytest.approx(r["wide_ms"] / r["torch_ms"])
    # the wide path the bench times at 16 channels (which the product never takes there)
    # still computes BatchNorm
    import torch
    x = torch.randn(8, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(16)
    assert torch.allclose(batchnorm.wide_batch_norm(bn, x), torch.nn.BatchNorm2d(16)(x),
                          atol=1e-5)
    assert not batchnorm.uses_wide_path(bn, x)


def test_malloc_bench_measures_each_mode_with_speed_malloc_off_and_on(tmp_path):
    from octconv_exp.backends import allocator
    bench, results = _quick_run("bench_malloc", tmp_path, timeout=600)
    rows = results["rows"]
    assert [(r["case"], r["conv"]) for r in rows] == [
        (c, m) for c in bench.QUICK_CASES for m in bench.QUICK_MODES]
    for r in rows:
        assert r["ms_off"] > 0 and r["ms_on"] > 0
        assert r["fresh_mib_off"] >= 0 and r["fresh_mib_on"] >= 0
        assert r["time_on_over_off"] == pytest.approx(r["ms_on"] / r["ms_off"])
    # each child process applied the setting it was given, as a run would
    assert results["decisions"]["false"] == "off: speed.malloc=false"
    if allocator.glibc_malloc()[0] is not None:
        assert results["decisions"]["auto"].startswith("on: auto: on (CPU, glibc)")


def _inference_rows(medians, flops):
    """bench_inference rows of ResNet-50 at batch 1 from {(conv, alpha, runtime): (min, median,
    max) ms} and {(conv, alpha): counted FLOPs ratio}."""
    return [{"network": "resnet50", "batch": 1, "conv": conv, "alpha": alpha, "runtime": rt,
             "flops_ratio": flops[(conv, alpha)], "min_ms": lo, "q1_ms": mid, "median_ms": mid,
             "q3_ms": mid, "max_ms": hi}
            for (conv, alpha, rt), (lo, mid, hi) in medians.items()]


def test_inference_verdicts_compare_medians_with_the_flops_ratio_and_the_noise():
    bench = _load("bench_inference")
    flops = {("vanilla", None): 1.0, ("octave", 0.5): 0.58, ("multi-octave", 0.5): 0.58}
    # ORT: multi-octave 60 / 100 ms = 0.60x vanilla <= 1.15 x 0.58 = 0.667; eager misses
    rows = bench.add_ratios(_inference_rows({
        ("vanilla", None, "eager"): (90, 100, 110), ("octave", 0.5, "eager"): (95, 105, 115),
        ("multi-octave", 0.5, "eager"): (80, 90, 100),
        ("vanilla", None, "onnxruntime"): (95, 100, 105),
        ("octave", 0.5, "onnxruntime"): (60, 70, 80),
        ("multi-octave", 0.5, "onnxruntime"): (55, 60, 75)}, flops))
    target, noise = bench.verdicts(rows)
    assert target[1] is True and "onnxruntime multi-octave at 0.600x" in target[0]
    assert noise[1] is True and "0 of 2 cells slower" in noise[0]
    # multi-octave's fastest round slower than octave's slowest: beyond the noise
    rows = bench.add_ratios(_inference_rows({
        ("vanilla", None, "eager"): (90, 100, 110), ("octave", 0.5, "eager"): (65, 70, 74),
        ("multi-octave", 0.5, "eager"): (75, 80, 85)}, flops))
    target, noise = bench.verdicts(rows)
    assert target[1] is False and "0.700x" in target[0]  # octave, the better one: 0.70 > 0.667
    assert noise[1] is False and "1 of 1 cells slower" in noise[0]
    assert rows[2]["time_vs_octave"] == pytest.approx(80 / 70)


@pytest.mark.parametrize("onnx_batch", ["static", "dynamic"])
def test_inference_bench_exports_for_the_batch_size_it_times(onnx_batch):
    """--quick times batch 1 only: batch 3 here, each ONNX Runtime session taking it and giving
    eager torch's logits."""
    import argparse

    import torch

    pytest.importorskip("onnxruntime")
    bench = _load("bench_inference")
    args = argparse.Namespace(runtimes=["eager", "onnxruntime"], threads=1, ort_opt="all",
                              onnx_batch=onnx_batch)
    device = torch.device("cpu")
    prepared = bench.prepare_runtimes(bench.build_models("seed", [0.5], device), "seed", args,
                                      device, [])
    bench.add_onnx_runners(prepared, "seed", 3, args, device, [])
    x = torch.randn(3, 3, 32, 32)
    inputs = {"eager": x.contiguous(memory_format=torch.channels_last), "numpy": x.numpy()}
    assert [(p[0], sorted(p[4])) for p in prepared] == [
        (c, ["eager", "onnxruntime"]) for c in ("vanilla", "octave", "multi-octave")]
    for conv, _, _, _, runners, _ in prepared:
        want = runners["eager"](inputs)
        got = torch.from_numpy(runners["onnxruntime"](inputs))
        assert got.shape == want.shape == (3, 10)
        assert torch.allclose(got, want, atol=1e-4), conv


def test_inference_bench_quick_prints_the_table_with_ratios_of_medians(tmp_path):
    import importlib.util
    import json
    import math
    import subprocess
    import sys

    out = tmp_path / "inference.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_inference.py"),
                           "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    runtimes = ["eager"]
    if importlib.util.find_spec("onnxruntime") is not None:
        runtimes.append("onnxruntime")
    else:
        assert any("ONNX Runtime column skipped" in n for n in r["notes"])
    configs = [("vanilla", None)] + [(m, a) for a in (0.0, 0.5) for m in ("octave", "multi-octave")]
    assert [(x["network"], x["batch"], x["conv"], x["alpha"], x["runtime"]) for x in r["rows"]] == [
        (n, 1, c, a, rt) for n in ("seed", "resnet20") for c, a in configs for rt in runtimes]
    rows = {(x["network"], x["conv"], x["alpha"], x["runtime"]): x for x in r["rows"]}
    for (net, conv, alpha, rt), x in rows.items():
        assert x["rounds"] == 3
        assert 0 < x["min_ms"] <= x["q1_ms"] <= x["median_ms"] <= x["q3_ms"] <= x["max_ms"]
        vanilla = rows[(net, "vanilla", None, rt)]
        assert math.isfinite(x["time_vs_vanilla"])
        assert x["time_vs_vanilla"] == pytest.approx(x["median_ms"] / vanilla["median_ms"])
        assert x["time_vs_flops"] == pytest.approx(x["time_vs_vanilla"] / x["flops_ratio"])
        if conv == "multi-octave":
            octave = rows[(net, "octave", alpha, rt)]
            assert x["time_vs_octave"] == pytest.approx(x["median_ms"] / octave["median_ms"])
        # counted FLOPs: alpha 0 is a vanilla network, alpha 0.5 about half of one
        if conv == "vanilla" or alpha == 0.0:
            assert x["flops_ratio"] == pytest.approx(1.0)
        else:
            assert 0.4 < x["flops_ratio"] < 0.6
            assert x["flops_ratio"] == pytest.approx(x["flops_ratio_theoretical"], abs=0.02)
    # the printed markdown table: one line per (network, batch, conv, alpha), a column pair
    # per runtime, and both verdict lines (ResNet-50 is not in a quick run)
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| network | batch |"))
    assert lines[header].count("/ vanilla |") == 1 + len(runtimes)  # FLOPs, then each runtime
    body = lines[header + 2:header + 2 + 2 * len(configs)]
    assert all(line.startswith("| ") and line.count("|") == 6 + 2 * len(runtimes) for line in body)
    assert "load average" in lines[0]
    assert "[—] Oct-ResNet-50 alpha 0.5 batch 1 within 1.15x of its FLOPs ratio: not measured" \
        in done.stdout
    assert "multi-octave never slower than octave beyond the noise" in done.stdout
def test_busy_bench_times_each_mode_alone_and_beside_neighbours_in_fresh_processes(tmp_path):
    bench, results = _quick_run("bench_busy", tmp_path, timeout=600)
    rows = results["rows"]
    assert [(r["variant"], r["conv"]) for r in rows] == [
        (v, m) for v in bench.QUICK_VARIANTS for m in bench.MODES]
    # idle needs the right to raise a process's priority (root, CAP_SYS_NICE); the others not
    loads = {c["load"] for c in results["context"]}
    assert loads in ({"idle", "alone", "busy"}, {"alone", "busy"})
    for r in rows:
        assert r["ms_alone"] > 0 and r["ms_busy"] > 0
        assert r["busy_over_alone"] == pytest.approx(r["ms_busy"] / r["ms_alone"])
        assert r["images_per_s_busy"] == pytest.approx(bench.BATCH * 1e3 / r["ms_busy"])
        if "idle" in loads:
            assert r["busy_over_idle"] == pytest.approx(r["ms_busy"] / r["ms_idle"])
        else:
            assert r["ms_idle"] is None and r["busy_over_idle"] is None
    # each variant's process ran with the threads and the OpenMP environment it was given,
    # whatever this process's environment says
    context = {(c["variant"], c["load"]): c for c in results["context"]}
    assert set(context) == {(v, load) for v in bench.QUICK_VARIANTS for load in loads}
    for (variant, _load), c in context.items():
        threads, omp_env, mkldnn = bench.VARIANTS[variant]
        assert c["torch_threads"] == threads and c["mkldnn"] == mkldnn
        assert c["omp_wait_policy"] == omp_env.get("OMP_WAIT_POLICY")
        assert c["cores_used"] > 0
        assert c["machine_idle"] is None or 0 <= c["machine_idle"] <= 1


def test_busy_bench_neighbours_burn_only_while_resumed():
    """The neighbours run only while a busy sample is timed: stopped, they take no CPU."""
    import time

    bench = _load("bench_busy")

    def cpu_seconds(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with bench.Neighbours(1) as neighbours:
        pid = neighbours.pids[0]
        time.sleep(0.5)
        stopped = cpu_seconds(pid)
        time.sleep(0.5)
        assert cpu_seconds(pid) == stopped
        neighbours.resume()
        deadline = time.time() + 60
        while cpu_seconds(pid) <= stopped and time.time() < deadline:
            time.sleep(0.1)
        neighbours.pause()
        assert cpu_seconds(pid) > stopped
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped with the ``with``
