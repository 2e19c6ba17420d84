"""Head/token sensitivities, baselines, scorers, losses and the Sensitivities file, against independent references.

References: central finite differences of the real loss (the second-order model's coefficients),
brute-force sorting for keep curves, scipy for Spearman, explicit autograd for baselines, the naive
(unchunked) loss for the chunked LM loss.
"""
import json

import numpy as np
import pytest
import torch

from heart_onnx.errors import HeartError
from heart_onnx.sensitivities import Sensitivities
from heart_onnx.sensitivity import measure
from heart_onnx.sensitivity.api import analyze
from heart_onnx.sensitivity.loss import ce_loss, kl_loss, lm_kl_chunked
from heart_onnx.sensitivity.scorers import RidgeStats, spearman, topk_overlap
from heart_onnx.sensitivity.tokens import keep_curve_sums


def _vit(depth=2, dim=32, heads=4, dtype=torch.float64, seed=0):
    from heart_onnx.models import demo
    from heart_onnx.models.registry import adapt

    torch.manual_seed(seed)
    m = demo.build_vit(depth=depth, embed_dim=dim, num_heads=heads).eval().to(dtype)
    # random init is close to uniform attention: sharpen it so heads and tokens differ
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(3.0)
    return adapt(m)


def _finite_diff(f, eps=1e-3):
    """f(eps) = L(-eps z) - L(0) = -eps a + eps^2 b + O(eps^3): returns (a_hat, b_hat) = (g.z, 1/2 z^T H z)."""
    f0, fp, fm = f(0.0), f(eps), f(-eps)
    return -(fp - fm) / (2 * eps), (fp + fm - 2 * f0) / (2 * eps ** 2)


def _loss_with(adapter, x, dense, labels, hook_module, hook, pre):
    h = hook_module.register_forward_pre_hook(hook) if pre else hook_module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = adapter.forward(x)
            v = (ce_loss(out, labels) if labels is not None else kl_loss(out, dense)).sum()
    finally:
        h.remove()
    return float(v)


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_exact_head_scores_match_finite_differences(loss):
    a = _vit()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    batch = (x, y) if loss == "ce" else x
    sens = analyze(a, [batch], targets=("heads",), exact=True, loss=loss)
    with torch.no_grad():
        dense = a.forward(x)
    Dh = a.head_dim
    for l, h in [(0, 1), (1, 3)]:
        def f(eps, l=l, h=h):
            def pre(_m, args):
                z = args[0].clone()
                z[..., h * Dh:(h + 1) * Dh] *= 1 - eps
                return (z,)
            return _loss_with(a, x, dense, y if loss == "ce" else None, a.head_input_module(l), pre, True)
        g_dot_z, quad = _finite_diff(f)
        predicted = -g_dot_z + quad  # summed over the batch
        got = sens.head_per_input[:, l, h].sum()
        assert got == pytest.approx(predicted, rel=1e-3, abs=1e-9)
        if loss == "kl":
            assert abs(g_dot_z) < 1e-8  # dense point: no first-order term


def test_exact_token_gate_scores_match_finite_differences_and_drops():
    a = _vit(depth=3)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sens = analyze(a, [x], targets=("tokens",), exact=True, holdout=0)
    assert sens.meta["token_mode"] == "gate"
    assert np.isnan(sens.token_per_input[:, :, 0]).all()  # class token never scored
    with torch.no_grad():
        dense = a.forward(x)

    def gated(l, t, eps):
        # independent implementation: scale key t's probability in every later block, renormalise
        hs = []
        for k in range(l + 1, a.num_layers):
            def pre(_m, args):
                A = args[0].clone()
                A[..., t] *= 1 - eps
                return (A / A.sum(-1, keepdim=True),)
            hs.append(a.model.blocks[k].attn.attn_drop.register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                return float(kl_loss(a.forward(x), dense).sum())
        finally:
            for h in hs:
                h.remove()
    for l, t in [(0, 5), (1, 12)]:
        _, quad = _finite_diff(lambda e: gated(l, t, e))
        assert sens.token_per_input[:, l, t].sum() == pytest.approx(quad, rel=1e-3)
        # the gate at eps=1 IS the dropped model
        drop = measure.token_drop_losses(a, x, l, torch.full((2, 1), t)).sum()
        assert drop == pytest.approx(gated(l, t, 1.0), rel=1e-9)
    # after the last block only the class token is read: dropping others changes nothing
    assert np.allclose(sens.token_per_input[:, -1, 1:], 0, atol=1e-12)


def test_exact_token_hidden_scores_match_finite_differences():
    a = _vit(depth=3)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sens = analyze(a, [x], targets=("tokens",), exact=True, holdout=0, token_mode="hidden")
    with torch.no_grad():
        dense = a.forward(x)
    for l, t in [(0, 5)]:
        def f(eps, l=l, t=t):
            def post(_m, _args, out):
                out = out.clone()
                out[:, t] *= 1 - eps
                return out
            return _loss_with(a, x, dense, None, a.block_module(l), post, False)
        _, quad = _finite_diff(f, eps=1e-2)
        assert sens.token_per_input[:, l, t].sum() == pytest.approx(quad, rel=2e-2)  # tiny value: FD roundoff


def test_probe_estimate_is_unbiased_and_converges():
    a = _vit(dtype=torch.float32)
    x = torch.randn(4, 1, 8, 8)
    ex = analyze(a, [x], targets=("heads", "tokens"), exact=True, holdout=0)
    pr = analyze(a, [x], targets=("heads", "tokens"), probes=256, seed=1, holdout=0)
    err = np.abs(pr.head - ex.head).max() / np.abs(ex.head).max()
    assert err < 0.15
    assert spearman(pr.head.ravel(), ex.head.ravel()) > 0.9
    t_ex, t_pr = ex.token_per_input[:, 0, 1:].mean(0), pr.token_per_input[:, 0, 1:].mean(0)
    assert spearman(t_pr, t_ex) > 0.8
    # seeded: same seed, same numbers
    pr2 = analyze(a, [x], targets=("heads",), probes=4, seed=3)
    pr3 = analyze(a, [x], targets=("heads",), probes=4, seed=3)
    assert np.array_equal(pr2.head_per_input, pr3.head_per_input)


def test_predicted_head_ranking_tracks_measured_removal():
    a = _vit(dtype=torch.float64, seed=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # give heads different weights (log-uniform output scales), as training does
        for blk in a.model.blocks:
            c = torch.exp(torch.empty(a.num_heads).uniform_(-1.5, 1.0, generator=g)).repeat_interleave(a.head_dim)
            blk.attn.proj.weight.mul_(c.double()[None, :])
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    sens = analyze(a, [x], targets=("heads",), exact=True)
    meas = measure.single_head_losses(a, x).mean(0)  # (L, H)
    assert spearman(sens.head.ravel(), meas.ravel()) > 0.9


def test_ggn_estimator_equals_exact_hvp_and_group_quadratic():
    from heart_onnx.sensitivity.hvp import HVP
    from heart_onnx.sensitivity.tokens import TokenGates, group_curve_sums
    from heart_onnx.sensitivity.probes import ggn_scores

    a = _vit(dtype=torch.float64, seed=3)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    ex = analyze(a, [x], exact=True, holdout=0)
    gg = analyze(a, [x], holdout=0)
    assert gg.meta["estimator"] == "ggn" and ex.meta["estimator"] == "hvp"
    np.testing.assert_allclose(gg.head_per_input, ex.head_per_input, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(gg.token_per_input, ex.token_per_input, rtol=1e-9, atol=1e-15)
    # group quadratic 1/2 d^T H d for d = -1 on a drop set, from the HVP, equals the GGN cumulative form
    params = []
    with TokenGates(a, None, params) as tg:
        out = a.forward(x)
    ggn_scores(out, params, [tg], 1, torch.Generator(), keep_dots=[tg])
    sc = np.random.default_rng(0).random((3, 2, 17))
    curve = group_curve_sums(tg.ggn_dots, tg.ggn_weights, sc, 1)
    params2 = []
    with TokenGates(a, None, params2):
        op = HVP(lambda: kl_loss(a.forward(x)).sum(), params2)
    order = np.argsort(sc[:, 0, 1:], axis=1) + 1
    for K in (16, 12, 5):
        v = [torch.zeros_like(p) for p in params2]
        for b in range(3):
            v[0][b, order[b, :17 - K]] = 1.0
        hv = op(v)
        assert curve[0, K] == pytest.approx(0.5 * float((v[0] * hv[0]).sum()), rel=1e-8)


def test_keep_curve_brute_force():
    rng = np.random.default_rng(0)
    B, L, N, P = 3, 2, 6, 1
    ts = rng.random((B, L, N))
    ts[:, :, :P] = np.nan
    sc = rng.random((B, L, N))
    sc[:, :, :P] = np.nan
    curve = keep_curve_sums(ts, sc, P)
    for l in range(L):
        assert np.isnan(curve[l, :P]).all() and curve[l, N] == 0
        for K in range(P, N + 1):
            ref = 0.0
            for b in range(B):
                order = np.argsort(-sc[b, l, P:])  # kept: top K-P by scorer
                dropped = order[K - P:] + P
                ref += ts[b, l, dropped].sum()
            assert curve[l, K] == pytest.approx(ref)


def test_token_scores_track_measured_single_drops():
    a = _vit(dtype=torch.float64, seed=3)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sens = analyze(a, [x], targets=("tokens",), exact=True, holdout=0, token_scorer="oracle")
    c = sens.token_keep_curve
    assert c.shape == (2, 18) and np.all(np.diff(c[0, 1:]) <= 1e-12)  # oracle curve falls as K grows
    pred = sens.token_per_input[:, 0, 1:]  # (B, 16)
    meas = np.stack([measure.token_drop_losses(a, x, 0, torch.full((4, 1), t)) for t in range(1, 17)], 1)
    assert np.all(spearman(pred, meas) > 0.85)
    assert np.allclose(pred, meas, rtol=0.3)  # second order is close for one token


def test_scorer_fit_and_quality_metrics():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8))
    w, b = rng.normal(size=8), 0.3
    st = RidgeStats(8)
    st.add(x[:250], x[:250] @ w + b)
    st.add(x[250:], x[250:] @ w + b)
    w_hat, b_hat = st.solve(ridge=1e-9)
    assert np.allclose(w_hat, w, atol=1e-4) and b_hat == pytest.approx(b, abs=1e-4)
    a, c = rng.normal(size=(4, 20)), rng.normal(size=(4, 20))
    for i in range(4):
        assert spearman(a[i], c[i]) == pytest.approx(spearmanr(a[i], c[i]).statistic)
    assert topk_overlap(a, a, 5).tolist() == [1.0] * 4
    top_a, top_c = set(np.argsort(-a[0])[:5]), set(np.argsort(-c[0])[:5])
    assert topk_overlap(a[:1], c[:1], 5)[0] == len(top_a & top_c) / 5


def test_analyze_fits_linear_scorer_and_reports_quality():
    a = _vit(dtype=torch.float32, seed=4)
    batches = [torch.randn(4, 1, 8, 8) for _ in range(4)]
    sens = analyze(a, batches, probes=2, holdout=0.25, estimator="hvp")
    assert sorted(sens.scorers) == [0, 1] and sens.scorers[0][0].shape == (32,)
    q = sens.scorer_quality
    assert q["linear"]["n_inputs"] == 4 and q["cls_attention"]["n_inputs"] == 4
    assert set(sens.token_keep_curves) == {"cls_attention", "oracle", "linear"}
    # the oracle (Hessian order) is the best possible drop order for the predicted curve
    for name in ("cls_attention", "linear"):
        assert np.all(sens.token_keep_curves["oracle"][:, 1:] <= sens.token_keep_curves[name][:, 1:] + 1e-9)


def test_baselines_against_autograd():
    a = _vit(dtype=torch.float64, seed=5)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    cap = {}

    def pre(_m, args):
        args[0].retain_grad()
        cap["z"] = args[0]
    blk = a.model.blocks[1]
    h = a.head_input_module(1).register_forward_pre_hook(pre)
    out = a.forward(x)
    h.remove()
    torch.nn.functional.cross_entropy(out, y, reduction="sum").backward()
    z, g = cap["z"].detach(), cap["z"].grad
    B, N, F = z.shape
    H = a.num_heads
    gz = (z * g).reshape(B, N, H, F // H).sum((1, 3))  # (B, H)
    norm = z.reshape(B, N, H, F // H).pow(2).sum((1, 3)).sqrt()
    fisher = analyze(a, [(x, y)], method="fisher", targets=("heads",))
    taylor = analyze(a, [(x, y)], method="taylor", targets=("heads",))
    mag = analyze(a, [(x, y)], method="magnitude", targets=("heads",))
    assert np.allclose(fisher.head_per_input[:, 1], 0.5 * gz.numpy() ** 2)
    assert np.allclose(taylor.head_per_input[:, 1], gz.abs().numpy())
    assert np.allclose(mag.head_per_input[:, 1], norm.numpy())
    assert fisher.meta["units"] == "nats" and mag.meta["method"] == "magnitude"
    r1 = analyze(a, [x], method="random", targets=("heads",), seed=7)
    assert np.array_equal(r1.head, analyze(a, [x], method="random", targets=("heads",), seed=7).head)
    cls = analyze(a, [x], method="cls_attention", targets=("tokens",))
    with a.attention_probs(0) as box:
        with torch.no_grad():
            a.forward(x)
    assert np.allclose(cls.token_per_input[:, 0, 1:], box.value[:, :, 0, 1:].mean(1).numpy())


def test_chunked_lm_kl_matches_naive_hvp():
    from heart_onnx.sensitivity.hvp import hvp

    torch.manual_seed(0)
    B, T, D, V = 2, 7, 6, 40
    W = torch.randn(V, D, dtype=torch.float64)
    lin = torch.nn.Linear(D, D).double()
    h0 = torch.randn(B, T, D, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    for target in (None, h0 + 0.2 * torch.randn_like(h0)):
        d = torch.zeros_like(h0, requires_grad=True)
        u = torch.randn_like(h0)
        tl = None if target is None else lin(target) @ W.T
        naive = lambda: kl_loss(lin(h0 + d) @ W.T, tl, mask).sum()
        chunk = lambda: lm_kl_chunked(lin(h0 + d), W, target_hidden=None if target is None else lin(target),
                                      mask=mask, chunk_rows=3)
        ref, got = hvp(naive, [d], [u])[0], hvp(chunk, [d], [u])[0]
        assert float((ref - got).norm() / ref.norm()) < 1e-10
        with torch.no_grad():
            assert float(chunk()) == pytest.approx(float(naive()), abs=1e-12)


def test_lm_heads_chunked_equals_unchunked():
    transformers = pytest.importorskip("transformers")
    from heart_onnx.models.registry import adapt
    from heart_onnx.sensitivity.api import Objective

    cfg = transformers.GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.GPTNeoXForCausalLM(cfg).eval().double()
    a = adapt(m)
    ids = torch.randint(0, 97, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    s1 = analyze(a, [batch], targets=("heads",), exact=True)
    orig = Objective.__init__

    def unchunked(self, adapter, name="kl", chunked=True):
        orig(self, adapter, name, chunked=False)
    Objective.__init__ = unchunked
    try:
        s2 = analyze(a, [batch], targets=("heads",), exact=True)
    finally:
        Objective.__init__ = orig
    assert np.allclose(s1.head_per_input, s2.head_per_input, rtol=1e-8, atol=1e-14)
    with pytest.raises(HeartError):
        analyze(a, [batch], targets=("tokens",))


def test_sensitivities_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    s = Sensitivities(
        meta={"family": "vit", "geometry": {"layers": 2, "prefix_tokens": 1}, "method": "hessian", "probes": 8},
        head=rng.random((2, 4)), head_per_input=rng.random((5, 2, 4)), token_per_input=rng.random((5, 2, 17)),
        token_keep_curve=rng.random((2, 18)), token_keep_curves={"linear": rng.random((2, 18))},
        scorers={0: (rng.random(32).astype(np.float32), 0.5), 1: (rng.random(32).astype(np.float32), -1.0)},
        scorer_quality={"linear": {"spearman": 0.7}}, pairs={"blocks.0.mlp.fc1/diag": rng.random((4, 3))},
    )
    s.token_per_input[:, :, 0] = np.nan
    p = s.save(tmp_path / "sens.npz")
    r = Sensitivities.load(p)
    assert r.meta == s.meta and r.scorer_quality == s.scorer_quality
    for k in ("head", "head_per_input", "token_per_input", "token_keep_curve"):
        assert np.array_equal(getattr(r, k), getattr(s, k), equal_nan=True)
    assert np.array_equal(r.token_keep_curves["linear"], s.token_keep_curves["linear"])
    assert r.scorers[1][1] == -1.0 and np.array_equal(r.scorers[0][0], s.scorers[0][0])
    assert np.array_equal(r.pairs["blocks.0.mlp.fc1/diag"], s.pairs["blocks.0.mlp.fc1/diag"])
    assert r.predicted_heads({0: [1], 1: [2]}) == pytest.approx(s.head[0, 1] + s.head[1, 2])
    assert json.dumps(r.summary())
    with np.load(p, allow_pickle=False) as z:  # plain npz, no pickles
        assert "__meta__" in z.files
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(HeartError):
        Sensitivities.load(tmp_path / "bad.npz")


def test_cli_analyze_demo_vit(tmp_path, capsys):
    from heart_onnx.cli.main import main

    out = tmp_path / "sens.npz"
    rc = main(["analyze", "--model", "demo-vit", "--data", "digits", "-n", "16", "--batch-size", "8", "--probes", "2",
               "-o", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    s = Sensitivities.load(out)
    assert summary["output"] == str(out) and s.meta["n_samples"] == 16 and s.meta["model"] == "demo-vit"
    assert s.head.shape == (4, 8) and s.token_keep_curve.shape == (4, 18) and sorted(s.scorers) == [0, 1, 2, 3]
    # user errors: one line, exit 1
    assert main(["analyze", "--model", "demo-vit", "--probes", "0", "-o", str(tmp_path / "x.npz")]) == 1
    assert main(["analyze", "--model", "no-such-model", "-o", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("heart-onnx analyze: error:") for e in err)
