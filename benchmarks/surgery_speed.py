"""Surgery speed benchmark: ViT-B/16 (random init) on ONNX Runtime CPU, pruned vs dense, in one run.

Protocol: timm ViT-B/16 at 224px, random weights, dynamo export (opset 18). Plans: tokens only
(30% / 50% of the patch tokens dropped after layer 3), heads only (25% / 50% of the heads of every
layer, lowest indices), both (50% heads + 30% tokens). ONNX Runtime CPUExecutionProvider,
``intra_op_num_threads`` = ``--threads`` (default 1), ORT_ENABLE_ALL, fp32, one session per graph,
all open at once.

Timing (per batch size, default 1 and 8): ``--warmup`` (default 2) runs of every graph, then
``--rounds`` (default 7) rounds; in each round every graph (dense, each pruned graph, each
static-slice variant) runs once, the order rotated by one each round, so slow drift of a shared
machine hits all graphs alike. Reported per graph: median, p10, p90 of its runs; per plan: the
latency ratio dense/pruned from the medians, the per-round ratios' p10..p90 (spread), the FLOPs
ratio (``heart_onnx.flops.model_flops``) and their quotient "efficiency" (target >= 0.9).
Selection overhead: the same token plan with the scorer + TopK + GatherElements replaced by a static
``Slice`` of the first tokens; overhead = (pruned - static) / pruned per round, median (target <= 3%).
On a 2-core machine shared with other processes the spread is wide: read the p10..p90 columns.

Graph check: ORT's optimised graph of every variant (``optimized_model_filepath``, weights written
aside) is dumped and its op-type counts reported next to the dense graph's, to show whether the
fusions ORT applies to the dense graph survive surgery. ``--profile`` adds ORT's per-op-type time
(``enable_profiling``, one run after a warm-up at the largest batch) for dense and each pruned graph,
and the kernel time of the nodes the token pass inserted (names ``heart_tokens*``: scorer, TopK,
index expansion, GatherElements, Concat) as a fraction of the pruned graph's kernel time: a
selection-overhead measure that wall-clock noise on a shared machine does not swamp.

Surgery cost (heads 50% + tokens 30% is the acceptance plan; every plan is measured): ``prune`` in a
fresh subprocess; wall time; peak RSS (``VmHWM``, the same high-water mark as ``ru_maxrss`` but not
inherited from the forking parent at exec) minus the peak after imports; tracemalloc peak
(Python allocations only: protobuf's upb arenas are C allocations that tracemalloc does not see) in a
second subprocess for the acceptance plan. Targets <= 15 s and <= 3x the model's weight bytes.

    OMP_NUM_THREADS=1 python benchmarks/surgery_speed.py --out artifacts/surgery_speed.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ACCEPT = "heads_50_tokens_30"

_SURGERY_CHILD = r"""
import json, sys, time
import numpy, onnx, onnx_graphsurgeon, onnxruntime  # noqa: F401 - baseline: the imports prune needs
from heart_onnx.plan import Plan
from heart_onnx.runtime.memory import peak_rss_bytes as hwm  # VmHWM: not the parent's ru_maxrss
from heart_onnx.surgery.api import prune
plan = Plan.load(sys.argv[2])
trace = sys.argv[4] == "1"
base = hwm()
if trace:
    import tracemalloc
    tracemalloc.start()
t0 = time.perf_counter()
prune(sys.argv[1], plan, sys.argv[3])
dt = time.perf_counter() - t0
peak = hwm()
out = {"seconds": dt, "rss_baseline_bytes": base, "rss_peak_bytes": peak, "rss_delta_bytes": peak - base}
if trace:
    out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
print(json.dumps(out))
"""


def _session(path: Path, threads: int, dump: Path | None = None, profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if dump is not None:
        so.optimized_model_filepath = str(dump)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dump.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _op_counts(path: Path, threads: int, work: Path) -> dict[str, int]:
    """Op-type counts of ORT's optimised graph of ``path``."""
    import onnx

    dump = work / (path.stem + ".ort_opt.onnx")
    sess = _session(path, threads, dump=dump)
    del sess
    m = onnx.load(str(dump), load_external_data=False)
    counts = collections.Counter(n.op_type for n in m.graph.node)
    for f in (dump, dump.with_name(dump.name + ".data")):
        f.unlink(missing_ok=True)
    return dict(sorted(counts.items()))


def _op_profile(path: Path, threads: int, batch: int, work: Path) -> dict[str, float]:
    """ORT per-op-type time (ms) of one run at ``batch`` (after one warm-up run)."""
    sess = _session(path, threads, profile=str(work / (path.stem + f"_prof_b{batch}")))
    x = {sess.get_inputs()[0].name: np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    sess.run(None, x)
    sess.run(None, x)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    per: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= last_start:
            per[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1000.0
            if e["name"].startswith("heart_tokens"):  # nodes the token pass inserted: scorer, TopK, gathers
                per["<heart_tokens nodes>"] += e["dur"] / 1000.0
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def _static_slice(src: Path, dst: Path) -> None:
    """Replace every token selection (GatherElements on tokens) by a static Slice of the first K tokens."""
    import onnx
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(onnx.load(str(src)))
    for n in list(g.nodes):
        if n.op == "GatherElements" and n.name.startswith("heart_tokens"):
            k = None
            e = n.inputs[1].inputs[0]  # Expand(Unsqueeze(idx))
            topk = e.inputs[0].inputs[0].inputs[0].inputs[0]
            if topk.op == "TopK":
                k = int(np.asarray(topk.inputs[1].values).reshape(-1)[0])
            if k is None:
                continue
            n.op = "Slice"
            n.attrs = {}
            n.inputs = [n.inputs[0], gs.Constant(n.name + "_s", np.array([0], np.int64)),
                        gs.Constant(n.name + "_e", np.array([k], np.int64)), gs.Constant(n.name + "_a", np.array([1], np.int64))]
    g.cleanup().toposort()
    onnx.save(gs.export_onnx(g), str(dst))


def _surgery_cost(dense: Path, plan_path: Path, out: Path, trace: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, "-c", _SURGERY_CHILD, str(dense), str(plan_path), str(out), "1" if trace else "0"],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"surgery subprocess failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _stats(ts: list[float]) -> dict:
    return {"median_s": statistics.median(ts), "p10_s": float(np.percentile(ts, 10)),
            "p90_s": float(np.percentile(ts, 90)), "runs": len(ts)}


def _time_rounds(sessions: dict, batch: int, warmup: int, rounds: int) -> dict[str, list[float]]:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    names = list(sessions)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k in names:
            sessions[k].run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/surgery_speed.json")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--plans", default="", help="comma-separated subset of the plan names (default all)")
    ap.add_argument("--profile", action="store_true", help="ORT per-op-type time of dense and pruned graphs")
    ap.add_argument("--skip-timing", action="store_true", help="surgery cost and graph checks only")
    args = ap.parse_args(argv)
    import onnxruntime
    import torch

    from heart_onnx.flops import model_flops
    from heart_onnx.models import zoo
    from heart_onnx.models.export import export
    from heart_onnx.models.fingerprint import fingerprint
    from heart_onnx.models.registry import adapt
    from heart_onnx.plan import Plan, TokenStage

    torch.manual_seed(0)
    model = zoo.vit_b_16()
    a = adapt(model)
    H, N, L = a.num_heads, a.seq_len, a.num_layers
    work = Path(tempfile.mkdtemp(prefix="heart_bench_"))
    dense = work / "dense.onnx"
    export(model, a.example_inputs(1), dense)
    fp, geo = fingerprint(model), a.geometry()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model

    def plan(frac_heads: float = 0.0, frac_tokens: float = 0.0) -> Plan:
        nh = int(round(H * frac_heads))
        heads = {l: tuple(range(nh)) for l in range(L)} if nh else {}
        toks = (TokenStage(3, N - int(round((N - 1) * frac_tokens))),) if frac_tokens else ()
        return Plan(fingerprint=fp, family="vit", geometry=geo, heads=heads, tokens=toks, prefix_tokens=1)

    plans = {"tokens_30": plan(0, 0.3), "tokens_50": plan(0, 0.5), "heads_25": plan(0.25), "heads_50": plan(0.5),
             ACCEPT: plan(0.5, 0.3)}
    if args.plans:
        plans = {k: v for k, v in plans.items() if k in args.plans.split(",")}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict = {}
    graphs = {"dense": dense}
    for name, p in plans.items():
        pp = p.save(work / f"{name}.plan.json")
        out = work / f"{name}.onnx"
        cost = _surgery_cost(dense, pp, out, trace=False)
        if name == ACCEPT:
            cost["tracemalloc_peak_bytes"] = _surgery_cost(dense, pp, work / "trace.onnx", trace=True)["tracemalloc_peak_bytes"]
            (work / "trace.onnx").unlink(missing_ok=True)
        cost["rss_delta_x_model"] = cost["rss_delta_bytes"] / model_bytes
        if "tracemalloc_peak_bytes" in cost:
            cost["tracemalloc_x_model"] = cost["tracemalloc_peak_bytes"] / model_bytes
        fl = model_flops(geo, p)
        results[name] = {"surgery": cost, "flops_dense": fl.dense, "flops_pruned": fl.pruned,
                         "flops_ratio": fl.dense / fl.pruned, "batches": {}}
        graphs[name] = out
        if p.tokens:
            st = work / f"{name}_static.onnx"
            _static_slice(out, st)
            graphs[name + "_static"] = st
        print(f"{name}: surgery {cost['seconds']:.2f} s, RSS +{cost['rss_delta_bytes'] / 2**20:.0f} MiB "
              f"({cost['rss_delta_x_model']:.2f}x model)", file=sys.stderr, flush=True)
    counts = {k: _op_counts(v, args.threads, work) for k, v in graphs.items()}
    for name in plans:
        d, c = counts["dense"], counts[name]
        results[name]["ort_op_counts"] = c
        results[name]["ort_op_count_diff"] = {op: c.get(op, 0) - d.get(op, 0) for op in sorted(set(d) | set(c))
                                              if c.get(op, 0) != d.get(op, 0)}
    if not args.skip_timing:
        sessions = {k: _session(v, args.threads) for k, v in graphs.items()}
        for b in sizes:
            times = _time_rounds(sessions, b, args.warmup, args.rounds)
            dense_t = times["dense"]
            for name, r in results.items():
                t = times[name]
                ratios = [d / x for d, x in zip(dense_t, t)]
                row = {"pruned": _stats(t), "dense": _stats(dense_t),
                       "latency_ratio": statistics.median(dense_t) / statistics.median(t),
                       "latency_ratio_rounds_p10": float(np.percentile(ratios, 10)),
                       "latency_ratio_rounds_p90": float(np.percentile(ratios, 90))}
                row["efficiency"] = row["latency_ratio"] / r["flops_ratio"]
                if name + "_static" in times:
                    ts = times[name + "_static"]
                    over = [(x - s) / x for x, s in zip(t, ts)]
                    row["static_slice"] = _stats(ts)
                    row["selection_overhead_frac"] = statistics.median(over)
                    row["selection_overhead_p10"] = float(np.percentile(over, 10))
                    row["selection_overhead_p90"] = float(np.percentile(over, 90))
                r["batches"][str(b)] = row
                print(f"  {name} batch {b}: latency x{row['latency_ratio']:.3f} "
                      f"[{row['latency_ratio_rounds_p10']:.3f}..{row['latency_ratio_rounds_p90']:.3f}] "
                      f"flops x{r['flops_ratio']:.3f} eff {row['efficiency']:.3f} "
                      f"overhead {row.get('selection_overhead_frac', float('nan')):.3f}", file=sys.stderr, flush=True)
        del sessions
    profiles = {}
    if args.profile:
        b = max(sizes)
        for k, v in graphs.items():
            if not k.endswith("_static"):
                profiles[k] = _op_profile(v, args.threads, b, work)
        for name, r in results.items():
            per = profiles[name]
            total = sum(x for op, x in per.items() if not op.startswith("<"))
            sel = per.get("<heart_tokens nodes>", 0.0)
            r["profile_batch"] = b
            r["profile_kernel_ms"] = total
            r["profile_selection_ms"] = sel
            r["profile_selection_frac"] = sel / total if total else None
            print(f"  {name} batch {b} profile: kernels {total:.0f} ms, token-selection nodes {sel:.2f} ms "
                  f"({100 * sel / total:.3f}%)", file=sys.stderr, flush=True)
    report = {
        "protocol": __doc__.strip(), "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "provider": "CPUExecutionProvider",
        "threads": args.threads, "precision": "fp32", "warmup": args.warmup, "rounds": args.rounds,
        "model": "timm vit_b_16 (random init), dynamo export", "model_bytes": model_bytes,
        "dense_file_bytes": dense.stat().st_size, "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "dense_ort_op_counts": counts["dense"], "results": results, "op_profile_ms": profiles,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
