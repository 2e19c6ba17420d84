"""Cost of Hessian sensitivities: HVP probe time vs forward+backward, and LM peak memory (chunked KL).

Protocol
--------
- Timing (``--what time``): per model, one fixed random batch. ``fwd+bwd``: forward, CE loss against
  random labels, ``backward()`` into the weights (a training step without optimizer). ``setup``: forward
  with the head and token perturbation hooks plus the first (create_graph) gradient, i.e. what
  ``analyze`` does once per batch. ``probe``: one HVP (one random-sign probe vector over all heads
  of all layers), what ``analyze(estimator="hvp")`` repeats ``probes`` times per target.
  ``ggn_forward`` / ``ggn_draw``: the default KL estimator's forward with hooks and ONE output-space
  backward (it does one per class for <= 64 classes, else ``probes`` sampled ones). Warm-up 1, then ``--repeats``
  runs, median and p90 reported. Ratio = probe / fwd+bwd (target <= 4). Models: the demo ViT
  (4x8 heads, 17 tokens) and ViT-B/16 geometry (random init, 12x12 heads, 197 tokens).
- Memory (``--what memory``): Pythia-160m geometry (random init, ``zoo.build("pythia-160m")``) at
  sequence ``--seq`` and batch ``--lm-batch``, head sensitivities with 1 probe, label-free KL, chunked
  (``loss.lm_kl_chunked``) vs naive (full (B, T, V) logits) HVP probes, and the GGN estimator, each in a
  fresh subprocess. On CUDA:
  ``torch.cuda.max_memory_allocated``; on CPU: peak RSS minus RSS after model load, where the peak is
  ``heart_onnx.runtime.memory.peak_rss_bytes`` (``VmHWM``) reset after the load (``reset_peak_rss``):
  ``ru_maxrss`` would carry the parent's high-water mark over ``exec`` (the timing part's ViT-B/16).

    OMP_NUM_THREADS=1 python benchmarks/sensitivity_cost.py --out artifacts/sensitivity_cost.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heart_onnx.models.registry import adapt  # noqa: E402
from heart_onnx.runtime.memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from heart_onnx.sensitivity.api import Objective, math_attention  # noqa: E402
from heart_onnx.sensitivity.heads import HeadPerturbation  # noqa: E402
from heart_onnx.sensitivity.hvp import HVP  # noqa: E402
from heart_onnx.sensitivity.tokens import TokenGates  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {"median_s": statistics.median(ts), "p90_s": ts[min(len(ts) - 1, int(0.9 * len(ts)))], "runs": len(ts)}


def time_model(name, model, batch, dev, repeats):
    a = adapt(model.to(dev).eval())
    x = a.example_inputs(batch).to(dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    obj = Objective(a, "kl")

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with math_attention():
            torch.nn.functional.cross_entropy(a.forward(x), y).backward()

    def setup():
        params = []
        with contextlib.ExitStack() as st:
            hp = st.enter_context(HeadPerturbation(a, None, params))
            tp = st.enter_context(TokenGates(a, None, params))
            op = HVP(lambda: obj(x), params)
        return op, hp, tp

    r = {"batch": batch, "device": str(dev), "fwd+bwd": _timed(fwd_bwd, dev, repeats), "setup": _timed(setup, dev, repeats)}
    for p in model.parameters():
        p.requires_grad_(False)  # activation HVPs need no weight gradients
    op, hp, tp = setup()
    g = torch.Generator().manual_seed(0)

    def probe_heads():
        v = [torch.zeros_like(p) for p in op.params]
        for i, z in zip(hp.slots, hp.z):
            s = (torch.randint(0, 2, (z.shape[0], a.num_heads), generator=g) * 2 - 1).to(z)
            v[i] = hp.scale(z, s)
        op(v)

    def probe_tokens():
        v = [torch.zeros_like(p) for p in op.params]
        for i, z in zip(tp.slots, tp.z):
            v[i] = (torch.randint(0, 2, z.shape, generator=g) * 2 - 1).to(z)
        op(v)
    def ggn_draw_setup():
        params = []
        with contextlib.ExitStack() as st:
            st.enter_context(math_attention())
            st.enter_context(HeadPerturbation(a, None, params))
            st.enter_context(TokenGates(a, None, params))
            logp = torch.log_softmax(a.forward(x), -1)
        return logp, params
    logp, gparams = ggn_draw_setup()

    def ggn_draw():
        torch.autograd.grad(logp[:, 0].sum(), gparams, retain_graph=True, allow_unused=True)
    r["ggn_forward"] = _timed(ggn_draw_setup, dev, repeats)
    r["ggn_draw"] = _timed(ggn_draw, dev, repeats)
    r["probe_heads"] = _timed(probe_heads, dev, repeats)
    r["probe_tokens"] = _timed(probe_tokens, dev, repeats)
    r["setup_no_weight_grads"] = _timed(setup, dev, repeats)
    for p in model.parameters():
        p.requires_grad_(True)
    fb = r["fwd+bwd"]["median_s"]
    r["ratio_probe_over_fwd_bwd"] = {"heads": r["probe_heads"]["median_s"] / fb, "tokens": r["probe_tokens"]["median_s"] / fb}
    r["ratio_setup_over_fwd_bwd"] = r["setup_no_weight_grads"]["median_s"] / fb
    r["ratio_ggn_draw_over_fwd_bwd"] = r["ggn_draw"]["median_s"] / fb
    r["ratio_ggn_forward_over_fwd_bwd"] = r["ggn_forward"]["median_s"] / fb
    print(name, json.dumps(r), flush=True)
    return r


def memory_child(seq, batch, mode):
    """Run in a subprocess: peak memory of one head-sensitivity batch on Pythia-160m.

    ``mode``: ``hvp-chunked`` (HVP probes, chunked LM-head KL), ``hvp-naive`` (HVP probes, full logits),
    ``ggn`` (output-space estimator: one backward per sampled label set, full logits, no double backward).
    """
    chunked = mode == "hvp-chunked"
    from heart_onnx.models import zoo
    from heart_onnx.sensitivity import api

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = zoo.build("pythia-160m").to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    a = adapt(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if mode == "hvp-naive":
        orig = api.Objective.__init__
        api.Objective.__init__ = lambda self, ad, name="kl", chunked=True: orig(self, ad, name, chunked=False)
    reset_peak_rss()
    base_rss = rss_bytes() / 2 ** 20
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    t = time.perf_counter()
    sens = api.analyze(a, [inputs], targets=("heads",), probes=1, estimator="ggn" if mode == "ggn" else "hvp")
    dt = time.perf_counter() - t
    out = {"seq": seq, "batch": batch, "mode": mode, "device": str(dev), "time_s": dt,
           "head_shape": list(sens.head.shape)}
    if dev.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["model_mib"] = base
    else:
        out["peak_rss_mib"] = peak_rss_bytes() / 2 ** 20
        out["rss_after_load_mib"] = base_rss
        out["peak_minus_load_mib"] = out["peak_rss_mib"] - base_rss
    print(json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/sensitivity_cost.json")
    ap.add_argument("--what", default="time,memory")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-vit-b", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--vit-b-batch", type=int, default=None, help="batch for ViT-B/16 (default --batch)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lm-batch", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        seq, batch, mode = args.child.split(",")
        memory_child(int(seq), int(batch), mode)
        return 0
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"protocol": __doc__.split("Protocol")[1].strip(), "torch": torch.__version__, "device": str(dev),
           "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    if "time" in args.what:
        from heart_onnx.models import demo, zoo

        if not args.skip_demo:
            res["demo_vit"] = time_model("demo_vit", demo.demo_vit(), args.batch, dev, args.repeats)
        if not args.skip_vit_b:
            res["vit_b_16"] = time_model("vit_b_16", zoo.build("vit_b_16"), args.vit_b_batch or args.batch, dev, args.repeats)
    if "memory" in args.what:
        res["pythia_160m"] = []
        for mode in ("hvp-chunked", "hvp-naive", "ggn"):
            p = subprocess.run([sys.executable, __file__, "--child", f"{args.seq},{args.lm_batch},{mode}"],
                               capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("{")]
            r = json.loads(line[-1]) if line else {"mode": mode, "error": p.stderr[-2000:]}
            print("pythia-160m", r, flush=True)
            res["pythia_160m"].append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
