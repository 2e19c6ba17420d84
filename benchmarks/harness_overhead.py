"""Harness overhead: heart-onnx's timing loop vs a bare ONNX Runtime loop, in the same run.

Protocol: one ONNX model (an MLP built with onnx.helper: --width, --depth, --batch), ONNX Runtime
CPU with --threads intra-op threads, one InferenceSession shared by both loops. ``--blocks`` pairs of
short blocks (bare then harness, then harness then bare, ...), each --repeats timed calls after
--warmup untimed ones; the bare loop is ``perf_counter(); sess.run(None, feed)`` with nothing else, the
harness is ``time_fn(lambda: OrtRunner.infer(feed))`` (the loop ``runtime.api.benchmark`` uses).
Reported: the median over pairs of (harness block median / bare block median) (acceptance: within
2% of 1; pairing cancels the drifts of a shared machine), the medians of all samples, and the
median of one full ``benchmark()`` call (environment and power recording around the same loop).

    python benchmarks/harness_overhead.py --out artifacts/harness_overhead.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def build_mlp(path: Path, width: int, depth: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(depth):
        inits += [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}")]
        out = "y" if i == depth - 1 else f"r{i}"
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [out])]
        cur = out
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/harness_overhead.json")
    ap.add_argument("--model", help="an ONNX model to use instead of the built MLP (needs static shapes or --batch)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=25)
    a = ap.parse_args(argv)

    import time

    from heart_onnx.runtime.api import benchmark
    from heart_onnx.runtime.env import environment
    from heart_onnx.runtime.inputs import random_feed
    from heart_onnx.runtime.ort import OrtRunner
    from heart_onnx.runtime.timing import time_fn

    tmp = tempfile.TemporaryDirectory()
    path = Path(a.model) if a.model else Path(tmp.name) / "mlp.onnx"
    if not a.model:
        build_mlp(path, a.width, a.depth)
    with OrtRunner(path, threads=a.threads) as r:
        feed = random_feed(r.input_specs(), batch=a.batch)
    bare_all, ours_all, blocks = [], [], []
    with OrtRunner(path, threads=a.threads) as runner:
        sess = runner.session

        def bare() -> list[float]:
            for _ in range(a.warmup):
                sess.run(None, feed)
            lat = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                sess.run(None, feed)
                lat.append((time.perf_counter() - t0) * 1e3)
            return lat

        def ours() -> list[float]:
            return time_fn(lambda: runner.infer(feed), warmup=a.warmup, repeats=a.repeats).latencies_ms

        for i in range(a.blocks):
            if i % 2 == 0:
                b, o = bare(), ours()
            else:
                o, b = ours(), bare()
            bare_all += b
            ours_all += o
            blocks.append({"bare_median_ms": float(np.median(b)), "harness_median_ms": float(np.median(o))})
    full = benchmark(path, batch=a.batch, warmup=10, repeats=100, threads=a.threads, power="none")
    bm, hm = float(np.median(bare_all)), float(np.median(ours_all))
    paired = float(np.median([x["harness_median_ms"] / x["bare_median_ms"] for x in blocks]))
    res = {
        "protocol": __doc__.strip().splitlines()[2:9], "model": str(a.model or f"mlp width {a.width} depth {a.depth}"),
        "batch": a.batch, "threads": a.threads, "blocks": a.blocks, "warmup": a.warmup, "repeats": a.repeats,
        "bare_median_ms": bm, "harness_median_ms": hm, "ratio_of_medians": hm / bm,
        "paired_ratio_median": paired, "within_2_percent": abs(paired - 1) <= 0.02, "per_block": blocks,
        "benchmark_api_median_ms": full.median_ms, "environment": environment("ort-cpu"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"bare {bm:.3f} ms, harness {hm:.3f} ms (ratio of medians {hm / bm:.4f}); paired block ratio {paired:.4f} "
          f"({'within' if res['within_2_percent'] else 'OUTSIDE'} 2%); "
          f"benchmark() {full.median_ms:.3f} ms -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
