"""``heart-onnx bench MODEL.onnx [--compare OTHER.onnx]``: latency, throughput and energy."""
from __future__ import annotations

import argparse

from .common import add_json_flag, emit_json, new_parser


def register(sub) -> None:
    p = new_parser(sub, "bench", "time an ONNX model (optionally against another, interleaved side by side)", (
        "heart-onnx bench model.onnx",
        "heart-onnx bench model.onnx --compare model.pruned.onnx --batch 8 --json",
        "heart-onnx bench model.onnx --backend trt --precision fp16 --cache-dir engines/",
        "heart-onnx bench model.onnx --backend trtexec --precision int8",
    ))
    p.add_argument("model", help="ONNX model to time")
    p.add_argument("--compare", metavar="OTHER.onnx", help="time OTHER.onnx interleaved with MODEL; prints the speed ratio")
    p.add_argument("--backend", default="ort-cpu", help="ort-cpu (default), ort-cuda, ort-trt, trt, trtexec")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8", "best"), help="default fp32")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls (default 50)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: runtime's choice)")
    p.add_argument("--shape", action="append", metavar="NAME:AxBxC", help="fix a dynamic input shape (repeatable)")
    p.add_argument("--power", default="auto", choices=("auto", "jtop", "tegrastats", "nvml", "none"), help="power source (default auto)")
    p.add_argument("--cache-dir", help="where TensorRT engines and timing caches are kept")
    p.add_argument("--output", "-o", metavar="PATH", help="also write the JSON result here (atomically)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _line(tag: str, r) -> str:
    t = r.timing
    e = r.energy
    en = f", {e['joules_per_inference'] * 1e3:.2f} mJ/inference @ {e['mean_power_w']:.1f} W ({e['source']})" if e else \
        f", energy n/a ({r.power.get('reason', '')})"
    return (f"{tag}{r.model} [{r.backend} {r.precision} batch {r.batch}]: median {t['median_ms']:.3f} ms, "
            f"p90 {t['p90_ms']:.3f} ms, p99 {t['p99_ms']:.3f} ms, {t['throughput_per_s']:.1f} items/s{en}")


def run(args: argparse.Namespace) -> int:
    import json

    from ..fileio import write_text_atomic
    from ..runtime.api import benchmark, benchmark_pair
    from ..runtime.inputs import parse_shapes

    shapes = parse_shapes(args.shape)
    kw = dict(backend=args.backend, batch=args.batch, warmup=args.warmup, repeats=args.repeats, precision=args.precision,
              power=args.power, shapes=shapes or None, threads=args.threads, cache_dir=args.cache_dir)
    if args.compare:
        res = benchmark_pair(args.model, args.compare, **kw)
        out = {"a": res["a"].to_dict(), "b": res["b"].to_dict(), "ratio": res["ratio"]}
        text = [_line("A ", res["a"]), _line("B ", res["b"]),
                f"speed-up B vs A: {res['ratio']:.3f}x (median latency ratio, measured interleaved in one run)"]
    else:
        res = benchmark(args.model, **kw)
        out = res.to_dict()
        text = [_line("", res)]
    if args.output:
        from .common import _default

        write_text_atomic(args.output, json.dumps(out, indent=1, default=_default))
    if args.json:
        emit_json(out)
    else:
        print("\n".join(text))
    return 0
