"""The Pythia sweep on a tiny GPT-NeoX: JSONL/CSV/PNG outputs, failed cells recorded, and resumption
after a SIGKILL mid-run without redoing finished cells."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from heart_onnx.errors import HeartError  # noqa: E402
from heart_onnx.llm.report import export_csv, plot_results  # noqa: E402
from heart_onnx.llm.sweep import SweepConfig, append_record, cells, read_results, run_sweep  # noqa: E402

TINY = "tiny:layers=2+hidden=32+heads=4+vocab=128+max_pos=128"


def test_small_grid_torch_and_onnx_runtime(tmp_path):
    cfg = SweepConfig(models=(TINY,), backends=("torch-cpu", "ort-cpu"), precisions=("fp32", "int8"), batches=(1, 2),
                      prompts=(5,), new_tokens=(4,), repeats=1, warmup=0, threads=1, power="none")
    s = run_sweep(cfg, tmp_path, progress=False)
    recs = read_results(tmp_path / "results.jsonl")
    assert s.total == len(recs) == 8 and s.ran == 8 and s.skipped == 0
    ok = {r["cell_id"]: r for r in recs if r["status"] == "ok"}
    bad = [r for r in recs if r["status"] == "error"]
    # int8 needs TensorRT: on ONNX Runtime CPU and PyTorch it is recorded as a failure, the sweep went on
    assert len(bad) == 4 and all(r["precision"] == "int8" for r in bad)
    assert all("TensorRT" in r["error"] for r in bad if r["backend"] == "ort-cpu")
    assert all("not available for PyTorch" in r["error"] for r in bad if r["backend"] == "torch-cpu")
    assert len(ok) == 4
    for r in ok.values():
        assert r["ttft_ms"] > 0 and r["e2e_latency_ms"] >= r["ttft_ms"] and r["decode_tokens_per_s"] > 0
        assert r["peak_rss_mb"] > 0 and r["energy_j_per_token"] is None and r["power_source"] == "none"
        assert r["environment"]["versions"]["onnxruntime"] and r["params"] > 0 and r["power_mode_recorded"]
    # same prompt, same weights, greedy: PyTorch and the ONNX KV decoder generate the same tokens
    for b in (1, 2):
        t = ok[f"{TINY}|torch-cpu|fp32|b{b}|p5|n4|current"]
        o = ok[f"{TINY}|ort-cpu|fp32|b{b}|p5|n4|current"]
        assert t["tokens_checksum"] == o["tokens_checksum"]
    # outputs: CSV rows and real PNG files
    csv_path = export_csv(tmp_path / "results.jsonl", tmp_path / "results.csv")
    rows = csv_path.read_text().strip().splitlines()
    assert len(rows) == 1 + 8 and rows[0].startswith("cell_id,status")
    pngs = plot_results(tmp_path / "results.jsonl", tmp_path)
    assert {p.name for p in pngs} == {"latency.png", "tokens_per_s.png", "energy_per_token.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # a second run skips everything, failed cells included; --retry-failed re-runs only those
    again = run_sweep(cfg, tmp_path, progress=False)
    assert again.ran == 0 and again.skipped == 8
    retry = run_sweep(SweepConfig(**{**cfg.__dict__, "retry_failed": True}), tmp_path, progress=False)
    assert retry.ran == 4 and retry.skipped == 4


def test_config_validation():
    with pytest.raises(HeartError, match="set-power-mode"):
        SweepConfig(models=(TINY,), power_modes=("0", "1")).validate()
    with pytest.raises(HeartError, match="unknown sweep backend"):
        SweepConfig(models=(TINY,), backends=("onnx",)).validate()
    with pytest.raises(HeartError, match="unknown model"):
        SweepConfig(models=("gpt-17",)).validate()
    g = cells(SweepConfig(models=(TINY,), backends=("torch-cpu", "ort-cpu"), batches=(1, 4), prompts=(32, 128)))
    assert len(g) == 8 and len({c.id for c in g}) == 8


def test_truncated_line_is_ignored_and_next_record_starts_clean(tmp_path):
    p = tmp_path / "results.jsonl"
    append_record(p, {"cell_id": "a", "status": "ok"})
    with open(p, "a") as f:
        f.write('{"cell_id": "b", "sta')  # a writer killed mid-line
    assert [r["cell_id"] for r in read_results(p)] == ["a"]
    append_record(p, {"cell_id": "c", "status": "ok"})
    assert [r["cell_id"] for r in read_results(p)] == ["a", "c"]


def test_sigkill_mid_sweep_then_resume(tmp_path):
    out = tmp_path / "sweep"
    model = "tiny:layers=4+hidden=128+heads=4+vocab=512+max_pos=256"
    args = ["--models", model, "--backends", "torch-cpu", "--batches", "1,2,3", "--prompts", "16,48,96",
            "--new-tokens", "16", "--repeats", "2", "--warmup", "0", "--power", "none", "--seed", "3", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "heart_onnx", "sweep", *args, "-o", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 150
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(read_results(results)) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = read_results(results)
    total = 9
    assert 2 <= len(before) < total
    # re-run the same sweep (the CLI's options as a SweepConfig, in this process to save a start-up):
    # finished cells are skipped, only the rest runs
    cfg = SweepConfig(models=(model,), backends=("torch-cpu",), batches=(1, 2, 3), prompts=(16, 48, 96), new_tokens=(16,),
                      repeats=2, warmup=0, power="none", seed=3)
    s = run_sweep(cfg, out, progress=False)
    assert s.skipped == len(before) and s.ran == total - len(before) and s.failed == 0
    after = read_results(results)
    ids = [x["cell_id"] for x in after]
    assert len(ids) == len(set(ids)) == total  # nothing redone, nothing missing
    first = {x["cell_id"]: x["finished_at"] for x in before}
    assert all(x["finished_at"] == first[x["cell_id"]] for x in after if x["cell_id"] in first)


def _checkpoint(tmp_path):
    """A tiny GPT-NeoX saved as a local checkpoint folder with a word-level tokenizer (no hub access)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from heart_onnx.llm.models import ModelSpec

    words = ["[UNK]"] + [f"w{i}" for i in range(63)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "ckpt"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(5)
    ModelSpec.parse("tiny:layers=2+hidden=32+heads=4+vocab=64+max_pos=64").build(seed=5).save_pretrained(folder)
    rng = __import__("numpy").random.default_rng(0)
    text = " ".join(f"w{i}" for i in rng.integers(0, 63, 40))
    (tmp_path / "text.txt").write_text(text)
    return folder, tmp_path / "text.txt"


def test_perplexity_real_weights_against_cross_entropy(tmp_path):
    import torch

    from heart_onnx.llm.models import ModelSpec
    from heart_onnx.llm.perplexity import perplexity_file

    folder, text = _checkpoint(tmp_path)
    spec = ModelSpec.parse(str(folder))
    assert spec.real_weights
    model, tok = spec.build(), spec.tokenizer()
    got = perplexity_file(model, tok, str(text), max_len=64, stride=32)
    ids = tok(text.read_text(), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert got["tokens"] == ids.shape[1] - 1 == 39
    assert got["perplexity"] == pytest.approx(float(torch.exp(ce)), rel=1e-5)
    strided = perplexity_file(model, tok, str(text), max_len=16, stride=8)  # shorter context: every token once
    assert strided["tokens"] == 39 and strided["perplexity"] > 1
    # the sweep records it for cells of real-weight models
    cfg = SweepConfig(models=(str(folder),), backends=("torch-cpu",), batches=(1,), prompts=(4,), new_tokens=(2,),
                      repeats=1, warmup=0, power="none", text_file=str(text))
    s = run_sweep(cfg, tmp_path / "sw", progress=False)
    (rec,) = s.records
    assert rec["status"] == "ok" and rec["real_weights"] is True
    assert rec["perplexity"] == pytest.approx(perplexity_file(model, tok, str(text))["perplexity"], rel=1e-6)


def test_plan_head_pruning_applied_before_measuring(tmp_path):
    """A Plan removing heads changes what the model generates, identically in PyTorch and in the exported ONNX."""
    from heart_onnx.llm.models import ModelSpec
    from heart_onnx.models.fingerprint import fingerprint
    from heart_onnx.models.registry import adapt
    from heart_onnx.plan import Plan

    spec = "tiny:layers=2+hidden=32+heads=4+vocab=128+max_pos=128"
    model = ModelSpec.parse(spec).build(seed=0)
    ad = adapt(model)
    plan = Plan(fingerprint=fingerprint(model), family=ad.family, geometry=ad.geometry(), heads={0: (0, 1, 2), 1: (3,)},
                prefix_tokens=0)
    plan_path = plan.save(tmp_path / "plan.json")
    base = dict(models=(spec,), backends=("torch-cpu", "ort-cpu"), batches=(2,), prompts=(6,), new_tokens=(6,), repeats=1,
                warmup=0, threads=1, power="none")
    dense = {r["backend"]: r for r in run_sweep(SweepConfig(**base), tmp_path / "dense", progress=False).records}
    pruned = {r["backend"]: r for r in run_sweep(SweepConfig(**base, plan=str(plan_path)), tmp_path / "pruned", progress=False).records}
    assert all(r["status"] == "ok" for r in [*dense.values(), *pruned.values()]), [r.get("error") for r in pruned.values()]
    assert pruned["torch-cpu"]["plan_sha"] and pruned["torch-cpu"]["tokens_checksum"] == pruned["ort-cpu"]["tokens_checksum"]
    assert dense["torch-cpu"]["tokens_checksum"] == dense["ort-cpu"]["tokens_checksum"]
    assert pruned["torch-cpu"]["tokens_checksum"] != dense["torch-cpu"]["tokens_checksum"]
