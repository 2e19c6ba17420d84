"""Weight sensitivities and pair merging, each number against an independent reference.

- Hutchinson diagonal, power-iteration curvature and Gram matrices vs the exact Hessian
  (``torch.func.hessian``) and direct sums on a tiny MLP;
- the predicted loss change of a merge set vs the measured loss change where the second-order model is
  exact (one linear layer, MSE to the dense output: a quadratic loss whose Hessian is K-FAC exact);
- the ``camp`` coefficient is the minimiser (perturbing it raises the measured loss) and beats zeroing;
- structural contracts: 2:4 pattern, sparsity, partners never pruned, same row, cyclic order, channel
  merges keep the function when applied by the numpy rule and the torch reference alike.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from heart_onnx import pairing
from heart_onnx.errors import HeartError
from heart_onnx.models.base import ChannelPair, ModelAdapter
from heart_onnx.models.fingerprint import weight_sha
from heart_onnx.models.merge_weights import merged
from heart_onnx.sensitivity.pairs import calibration_loss, weight_sensitivities


class MLP(nn.Module):
    def __init__(self, d_in=6, hidden=8, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MLPAdapter(ModelAdapter):
    family, kind = "mlp", "classifier"

    @property
    def num_layers(self):
        return 1

    def weights(self):
        return {"fc1": self.model.fc1, "fc2": self.model.fc2}

    def channel_pairs(self):
        return [ChannelPair("fc1", "fc2")]


class Lin(nn.Module):
    def __init__(self, d_in=8, d_out=5):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.fc(x)


class LinAdapter(ModelAdapter):
    family, kind = "lin", "encoder"

    @property
    def num_layers(self):
        return 1

    def weights(self):
        return {"fc": self.model.fc}


def _exact(model, x, names, loss="kl"):
    """Exact Hessian of the mean calibration loss w.r.t. each named weight (blocks), via torch.func."""
    from torch.func import functional_call, hessian

    params = dict(model.named_parameters())
    with torch.no_grad():
        dense = model(x)
    out = {}
    for n in names:
        def f(w, n=n):
            return calibration_loss(functional_call(model, {**params, n: w}, (x,)), dense, None, loss)
        h = hessian(f)(params[n].detach())
        k = params[n].numel()
        out[n] = h.detach().reshape(k, k).double()
    return out


def _exact_joint(model, x, names):
    from torch.func import functional_call, hessian

    params = dict(model.named_parameters())
    with torch.no_grad():
        dense = model(x)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        parts = dict(zip(names, (t.reshape(sh) for t, sh in zip(torch.split(flat, sizes), shapes))))
        return calibration_loss(functional_call(model, {**params, **parts}, (x,)), dense, None, "kl")
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return hessian(f)(flat).detach()


def test_hdiag_curvature_gram_vs_exact_hessian():
    torch.manual_seed(0)
    model = MLP().double().eval()
    x = torch.randn(32, 6, dtype=torch.float64)
    n_probes = 200
    sens = weight_sensitivities(MLPAdapter(model), [x], probes=n_probes, power_iters=60, seed=1)
    names = ["fc1.weight", "fc2.weight"]
    joint = _exact_joint(model, x, names)  # (80, 80): both weights, the estimator probes them together
    d = torch.diagonal(joint).numpy()
    est = np.concatenate([sens[n]["hdiag"].reshape(-1) for n in names])
    off = joint.numpy() - np.diag(d)
    se = np.sqrt((off ** 2).sum(1) / n_probes)  # std. error of mean_k v_i (H v)_i for Rademacher v
    z = np.abs(est - d) / np.maximum(se, 1e-12)
    assert z.max() < 5.0, f"Hutchinson diagonal {z.max():.1f} standard errors from the exact diagonal"
    assert z.mean() < 1.5  # |N(0,1)| has mean 0.8: unbiased, with the textbook variance
    ex = _exact(model, x, names)
    for n in names:
        assert sens[n]["sha"].item() == weight_sha(model.get_parameter(n))
        top = float(torch.linalg.eigvalsh(ex[n]).max())  # curvature: top eigenvalue of the layer's block
        assert abs(float(sens[n]["curvature"]) - top) <= 0.01 * top
    # Gram of fc1's input and of fc2's input channels, summed directly
    np.testing.assert_allclose(sens["fc1.weight"]["gram"], (x.T @ x / len(x)).numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        a = torch.tanh(model.fc1(x))
    np.testing.assert_allclose(sens["fc1.weight"]["consumer_gram"], (a.T @ a / len(a)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sens["fc1.weight"]["consumer_hdiag"], sens["fc2.weight"]["hdiag"])


def _lin_setup(seed=0, n=256):
    """One linear layer, correlated inputs, MSE to the dense output: the second-order model is exact."""
    g = torch.Generator().manual_seed(seed)
    model = Lin().eval()
    base = torch.randn(n, 8, generator=g)
    mix = torch.eye(8) + 0.8 * torch.randn(8, 8, generator=g)
    x = base @ mix
    with torch.no_grad():
        dense = model(x)
    gram = (x.T @ x / n).double().numpy()
    w = model.fc.weight.detach().numpy()
    # exact Hessian diagonal of mean_b mean_o (y - y_dense)^2: 2/out * Sigma_rr for every row
    h = np.tile(2.0 / w.shape[0] * np.diag(gram), (w.shape[0], 1))
    entry = {"name": np.array("fc.weight"), "sha": np.array(weight_sha(model.fc.weight)), "shape": np.array(w.shape),
             "weight": w.copy(), "hdiag": h, "curvature": np.array(np.inf), "gram": gram}

    def measured(merges):
        with torch.no_grad():
            return float(calibration_loss(merged(model, merges)(x), dense, None, "mse")) * 1.0
    return model, entry, measured


@pytest.mark.parametrize("granularity,sparsity", [("unstructured", 0.5), ("unstructured", 0.25), ("2:4", 0.5)])
@pytest.mark.parametrize("method", pairing.METHODS)
def test_predicted_loss_is_exact_for_quadratic_loss(granularity, sparsity, method):
    _, entry, measured = _lin_setup()
    m = pairing.make_merge(entry, granularity, sparsity, method)
    pred = pairing.predicted_loss(entry, m)
    meas = measured((m,))
    assert meas > 0
    assert abs(pred - meas) <= 1e-4 * meas + 1e-7, (pred, meas)


def test_camp_coefficient_is_the_minimiser_and_beats_zeroing():
    _, entry, measured = _lin_setup(seed=3)
    m = pairing.make_merge(entry, "unstructured", 0.5, "camp")
    zero = pairing.make_merge(entry, "unstructured", 0.5, "hessian")
    np.testing.assert_array_equal(np.sort(m.pruned), np.sort(zero.pruned))
    base = measured((m,))
    assert base < measured((zero,))
    for i in range(0, len(m.pruned), 3):  # for one pair alone, c* minimises the loss of moving w_p to w_q
        def single(c, i=i):
            return measured((pairing.WeightMerge(m.weight, m.weight_sha, m.shape, m.granularity, m.pruned[i:i + 1],
                                                 m.partner[i:i + 1], np.array([c], np.float32)),))
        best = single(float(m.coef[i]))
        for eps in (-0.05, 0.05):
            assert single(float(m.coef[i]) + eps) > best
    # for one isolated pair the loss is 1/2 h_p w_p^2 (1 - rho^2): check against the measurement
    one = pairing.WeightMerge(m.weight, m.weight_sha, m.shape, m.granularity, m.pruned[:1], m.partner[:1], m.coef[:1])
    r = entry["weight"].shape[1]
    p, q = int(m.pruned[0]) % r, int(m.partner[0]) % r
    g = entry["gram"]
    rho2 = g[p, q] ** 2 / (g[p, p] * g[q, q])
    w_p = entry["weight"].reshape(-1)[m.pruned[0]]
    want = 0.5 * entry["hdiag"].reshape(-1)[m.pruned[0]] * w_p ** 2 * (1 - rho2)
    np.testing.assert_allclose(measured((one,)), want, rtol=1e-4)


def _entry(shape, seed=0, consumer_shape=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    e = {"name": np.array("w"), "sha": np.array("0" * 64), "shape": np.array(shape), "weight": w,
         "hdiag": rng.uniform(0.1, 1, shape), "curvature": np.array(0.8)}
    r = int(np.prod(shape[1:]))
    a = rng.standard_normal((3 * r, r))
    e["gram"] = a.T @ a / len(a)
    if consumer_shape:
        c = rng.standard_normal(consumer_shape).astype(np.float32)
        b = np.abs(rng.standard_normal((64, consumer_shape[1])))
        e.update({"consumer": np.array("c"), "consumer_sha": np.array("1" * 64), "consumer_shape": np.array(consumer_shape),
                  "consumer_weight": c, "consumer_hdiag": rng.uniform(0.1, 1, consumer_shape),
                  "consumer_curvature": np.array(2.0), "consumer_gram": b.T @ b / 64})
    return e


@pytest.mark.parametrize("shape", [(6, 8), (4, 8, 3, 3)])
@pytest.mark.parametrize("method", pairing.METHODS)
def test_two_four_pattern_and_contracts(shape, method):
    e = _entry(shape)
    m = pairing.make_merge(e, "2:4", 0.5, method)
    w = pairing.apply_rule(e["weight"], m)
    groups = np.moveaxis(w.reshape(shape[0], shape[1], -1), 1, 2).reshape(-1, 4)  # 4 consecutive inputs
    assert np.all((groups != 0).sum(1) == 2)
    assert len(m.pruned) == w.size // 2
    assert not set(m.partner.tolist()) & set(m.pruned.tolist())
    r = int(np.prod(shape[1:]))
    assert np.all(m.pruned // r == m.partner // r)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.95])
def test_unstructured_sparsity_partners_and_cyclic_order(sparsity):
    e = _entry((5, 12), seed=2)
    m = pairing.make_merge(e, "unstructured", sparsity, "half")
    n = e["weight"].size
    assert len(m.pruned) == min(round(sparsity * n), n - 5)
    assert len(np.unique(m.pruned)) == len(m.pruned)
    assert not set(m.partner.tolist()) & set(m.pruned.tolist())
    assert np.all(m.pruned // 12 == m.partner // 12)
    np.testing.assert_array_equal(m.coef, 0.5)
    w = pairing.apply_rule(e["weight"], m)
    assert (w == 0).sum() == len(m.pruned)
    # cyclic: in each row, pruned by ascending significance -> kept by descending significance, wrapping
    sig = pairing.significance(e).reshape(-1)
    for row in range(5):
        sel = m.pruned // 12 == row
        pr, pa = m.pruned[sel], m.partner[sel]
        order = np.argsort(sig[pr], kind="stable")
        kept = np.array([i for i in range(row * 12, row * 12 + 12) if i not in set(m.pruned.tolist())])
        kept = kept[np.argsort(-sig[kept], kind="stable")]
        np.testing.assert_array_equal(pa[order], kept[np.arange(len(pr)) % len(kept)])


@pytest.mark.parametrize("granularity,shape", [("unstructured", (5, 12)), ("2:4", (3, 8, 2, 2)), ("channel", (10, 3))])
def test_best_pairing_picks_the_most_correlated_kept_partner(granularity, shape):
    e = _entry(shape, seed=9, consumer_shape=(4, shape[0]) if granularity == "channel" else None)
    m = pairing.make_merge(e, granularity, 0.5, "camp")  # default pairing="best"
    gram = e["consumer_gram"] if granularity == "channel" else e["gram"]
    c2 = gram ** 2 / np.outer(np.diag(gram), np.diag(gram))
    r = shape[0] if granularity == "channel" else int(np.prod(shape[1:]))
    pruned = set(m.pruned.tolist())
    k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    for p, q, c in zip(m.pruned, m.partner, m.coef):
        row = p // r if granularity != "channel" else 0
        members = range(row * r, row * r + r) if granularity != "channel" else range(shape[0])
        if granularity == "2:4":  # the other members of p's group of four input channels
            o, i, t = p // r, (p % r) // k, p % k
            members = [o * r + (4 * (i // 4) + u) * k + t for u in range(4)]
        kept = [x for x in members if x not in pruned]
        rp, rq = (p % r, q % r) if granularity != "channel" else (p, q)
        best = max(c2[rp, x % r if granularity != "channel" else x] for x in kept)
        assert q in kept and c2[rp, rq] == pytest.approx(best)
        assert c == pytest.approx(gram[rp, rq] / gram[rq, rq], rel=1e-5)


def test_channel_merge_rule_and_torch_reference_agree():
    torch.manual_seed(0)
    model = MLP(6, 12, 5).eval()
    e = _entry((12, 6), seed=4, consumer_shape=(5, 12))
    e.update({"weight": model.fc1.weight.detach().numpy().copy(), "consumer_weight": model.fc2.weight.detach().numpy().copy(),
              "name": np.array("fc1.weight"), "sha": np.array(weight_sha(model.fc1.weight)),
              "consumer": np.array("fc2.weight"), "consumer_sha": np.array(weight_sha(model.fc2.weight))})
    for method in pairing.METHODS:
        m = pairing.make_merge(e, "channel", 0.5, method)
        assert len(m.pruned) == 6 and not set(m.partner.tolist()) & set(m.pruned.tolist())
        ref = merged(model, (m,))
        np.testing.assert_array_equal(ref.fc2.weight.detach().numpy(), pairing.apply_rule(e["consumer_weight"], m, "consumer"))
        assert torch.all(ref.fc1.weight[torch.as_tensor(m.pruned)] == 0) and torch.all(ref.fc1.bias[torch.as_tensor(m.pruned)] == 0)
        # the shrunk network (pruned channels removed) computes the same function as the masked one
        keep = np.setdiff1d(np.arange(12), m.pruned)
        x = torch.randn(7, 6)
        with torch.no_grad():
            h = torch.tanh(x @ ref.fc1.weight[keep].T + ref.fc1.bias[keep])
            small = h @ ref.fc2.weight[:, keep].T + ref.fc2.bias
            torch.testing.assert_close(small, ref(x), rtol=0, atol=1e-6)


def test_channel_prediction_matches_measurement_on_linear_consumer():
    """Merging channels = merging the consumer's columns: exact for the quadratic loss of the consumer alone."""
    _, entry, measured = _lin_setup(seed=5)
    e = dict(entry)
    e.update({"consumer": np.array("fc.weight"), "consumer_sha": entry["sha"], "consumer_shape": entry["shape"],
              "consumer_weight": entry["weight"], "consumer_hdiag": entry["hdiag"],
              "consumer_curvature": np.array(np.inf), "consumer_gram": entry["gram"],
              "name": np.array("producer"), "sha": np.array("0" * 64), "shape": np.array([8, 3]),
              "weight": np.ones((8, 3), np.float32)})
    m = pairing.make_merge(e, "channel", 0.5, "camp")
    pred = pairing.predicted_loss(e, m)
    c = pairing.WeightMerge("fc.weight", entry["sha"].item(), tuple(entry["shape"]), "unstructured",
                            *_columns_as_flat(m, entry["weight"].shape))
    np.testing.assert_allclose(pred, measured((c,)), rtol=1e-4)
    assert pred < pairing.predicted_loss(e, pairing.make_merge(e, "channel", 0.5, "hessian"))


def _columns_as_flat(m, shape):
    out, r = shape
    rows = np.arange(out)[:, None]
    pr = (rows * r + m.pruned[None, :]).reshape(-1)
    pa = (rows * r + m.partner[None, :]).reshape(-1)
    return pr, pa, np.tile(m.coef, out)


def test_merge_curve_monotone_and_errors():
    e = _entry((8, 16), seed=7, consumer_shape=(4, 8))
    for gran, sps in (("unstructured", [0, 0.2, 0.4, 0.6, 0.8]), ("channel", [0, 0.25, 0.5, 0.75])):
        curve = pairing.merge_curve(e, gran, sps, "hessian")
        assert curve[0] == 0 and np.all(np.diff(curve) >= -1e-12)
    assert pairing.merge_curve(e, "2:4", [0.0, 0.5]).shape == (2,)
    with pytest.raises(HeartError, match="2:4"):
        pairing.make_merge(e, "2:4", 0.3)
    with pytest.raises(HeartError, match="method"):
        pairing.make_merge(e, "unstructured", 0.3, "nope")
    with pytest.raises(HeartError, match="range"):
        pairing.make_merge(e, "unstructured", 1.0)
    bad = _entry((4, 6))
    assert not pairing.supports(bad, "2:4") and not pairing.supports(bad, "channel")
    with pytest.raises(HeartError, match="does not support"):
        pairing.make_merge(bad, "2:4", 0.5)


def test_pack_roundtrips_through_sensitivities_file(tmp_path):
    from heart_onnx.sensitivities import Sensitivities

    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 6)
    ents = weight_sensitivities(MLPAdapter(model), [x], probes=4, power_iters=3)
    s = Sensitivities(meta={"family": "mlp"}, pairs=pairing.pack(ents))
    s.save(tmp_path / "s.npz")
    back = pairing.entries(Sensitivities.load(tmp_path / "s.npz").pairs)
    assert set(back) == set(ents)
    for n, e in ents.items():
        assert set(back[n]) == set(e)
        for k, v in e.items():
            np.testing.assert_array_equal(back[n][k], v)
    m = pairing.make_merge(back["fc1.weight"], "channel", 0.5)
    assert m.weight == "fc1.weight" and m.consumer == "fc2.weight"
    assert m.weight_sha == weight_sha(model.fc1.weight) and m.consumer_sha == weight_sha(model.fc2.weight)


def test_weight_sensitivities_on_tiny_vit_end_to_end():
    from heart_onnx.models.zoo import tiny_vit

    torch.manual_seed(0)
    model = tiny_vit().eval()
    x = torch.randn(8, 3, 32, 32)
    ents = weight_sensitivities(model, [x], probes=2, power_iters=2)
    assert "blocks.0.mlp.fc1.weight" in ents and ents["blocks.0.mlp.fc1.weight"]["consumer"].item() == "blocks.0.mlp.fc2.weight"
    merges = [pairing.make_merge(e, "2:4", 0.5) for e in ents.values() if pairing.supports(e, "2:4")]
    out = merged(model, merges)
    for m in merges:
        w = out.get_parameter(m.weight).detach().numpy()
        assert np.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2)
    for e in ents.values():
        assert np.all(np.isfinite(e["hdiag"])) and float(e["curvature"]) > 0


def test_grouped_conv_has_no_gram_and_still_merges():
    """Depthwise convs have no shared reduction axis: no Gram, camp falls back to zeroing (coef 0)."""
    from heart_onnx.models.zoo import tiny_mobilenetv2

    torch.manual_seed(0)
    model = tiny_mobilenetv2().eval()
    ents = weight_sensitivities(model, [torch.randn(2, 3, 32, 32)], probes=1, power_iters=1, channel=False)
    dw = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all("gram" not in ents[f"{n}.weight"] for n in dw)
    e = ents[f"{dw[0]}.weight"]
    m = pairing.make_merge(e, "unstructured", 0.5)
    assert np.all(m.coef == 0) and len(m.pruned) > 0
