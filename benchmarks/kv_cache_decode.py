"""Decode speed with the KV cache vs without, ONNX Runtime CPU (and PyTorch eager for reference).

Protocol: a Pythia geometry with random weights (--model, default pythia-70m; seed 0), exported once
as prefill.onnx + decode.onnx (--exporter, default TorchScript; "dynamo" also works, slower to export). Greedy generation of --new-tokens tokens from a
random prompt of --prompt tokens at --batch. Three generators run interleaved, --repeats rounds after
one warm-up round: ORT with cache (prefill once, then one decode step per token), ORT without cache
(the whole sequence through prefill.onnx every step), PyTorch eager with HF's cache. Reported per
generator: median time to first token, median decode tokens/s (batch * (new - 1) / decode seconds),
median end-to-end ms; the cache/no-cache decode speed-up; and whether all three produced the same tokens.

    python benchmarks/kv_cache_decode.py --out artifacts/kv_cache_decode.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/kv_cache_decode.json")
    ap.add_argument("--model", default="pythia-70m")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    ap.add_argument("--onnx-dir", help="keep/reuse the exported graphs here (default: a temporary folder)")
    a = ap.parse_args(argv)

    import torch

    from heart_onnx.llm.generate import OnnxKVDecoder, torch_generate
    from heart_onnx.llm.kv_export import export_kv_decoder, load_kv_decoder_files
    from heart_onnx.llm.models import ModelSpec, param_count
    from heart_onnx.runtime.env import environment

    torch.set_num_threads(a.threads)
    spec = ModelSpec.parse(a.model)
    model = spec.build(seed=0)
    tmp = tempfile.TemporaryDirectory()
    onnx_dir = Path(a.onnx_dir) if a.onnx_dir else Path(tmp.name)
    files = load_kv_decoder_files(onnx_dir) or export_kv_decoder(model, onnx_dir, exporter=a.exporter)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (a.batch, a.prompt)).astype(np.int64)
    runs: dict[str, list] = {"ort_kv_cache": [], "ort_no_cache": [], "torch_kv_cache": []}
    with OnnxKVDecoder(files, "ort-cpu", threads=a.threads) as dec:
        gens = {"ort_kv_cache": lambda: dec.generate(ids, a.new_tokens),
                "ort_no_cache": lambda: dec.generate_no_cache(ids, a.new_tokens),
                "torch_kv_cache": lambda: torch_generate(model, ids, a.new_tokens)}
        for g in gens.values():  # warm-up round
            g()
        for i in range(a.repeats):
            order = list(gens) if i % 2 == 0 else list(gens)[::-1]
            for k in order:
                runs[k].append(gens[k]())
    res = {"protocol": __doc__.strip().splitlines()[2:9], "model": spec.name, "exporter": a.exporter, "params": param_count(model), "prompt": a.prompt,
           "new_tokens": a.new_tokens, "batch": a.batch, "threads": a.threads, "repeats": a.repeats}
    for k, rs in runs.items():
        res[k] = {"ttft_ms": float(np.median([r.ttft_s * 1e3 for r in rs])),
                  "decode_tokens_per_s": float(np.median([r.decode_tokens_per_s for r in rs])),
                  "e2e_ms": float(np.median([r.e2e_s * 1e3 for r in rs]))}
    res["decode_speedup_cache_vs_no_cache"] = res["ort_kv_cache"]["decode_tokens_per_s"] / res["ort_no_cache"]["decode_tokens_per_s"]
    t0 = runs["torch_kv_cache"][0].tokens
    res["same_tokens_all_generators"] = all(np.array_equal(r.tokens, t0) for rs in runs.values() for r in rs)
    res["environment"] = environment("ort-cpu")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    for k in runs:
        print(f"{k:15s} ttft {res[k]['ttft_ms']:8.1f} ms  decode {res[k]['decode_tokens_per_s']:7.2f} tok/s  e2e {res[k]['e2e_ms']:8.1f} ms")
    print(f"decode speed-up with cache: {res['decode_speedup_cache_vs_no_cache']:.2f}x; same tokens: {res['same_tokens_all_generators']} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
