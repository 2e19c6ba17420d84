"""hvp.py against the exact Hessian from torch.func.hessian on a small MLP and a tiny attention model."""
import pytest
import torch

from heart_onnx.sensitivity.hvp import HVP, hutchinson_diag, hutchinson_trace, hvp, hvp_func, power_iteration


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    flat0 = torch.randn(sum(torch.Size(s).numel() for s in shapes), generator=g, dtype=dtype) * 0.7

    def unflat(flat):
        out, i = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            out.append(flat[i:i + n].reshape(s))
            i += n
        return out

    def f(w1, b1, w2, b2):
        h = torch.tanh(x @ w1.T + b1)  # (16, 7)
        return torch.nn.functional.cross_entropy(h @ w2.T + b2, y)

    def f_flat(flat):
        return f(*unflat(flat))

    H = torch.func.hessian(f_flat)(flat0)
    params = [p.clone().requires_grad_(True) for p in unflat(flat0)]
    return f, params, H, unflat


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hvp_matches_exact(dtype):
    f, params, H, unflat = _problem(dtype)
    v_flat = torch.randn(H.shape[0], dtype=dtype)
    ref = H @ v_flat
    got = torch.cat([t.flatten() for t in hvp(lambda: f(*params), params, unflat(v_flat))])
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert float((got - ref).norm() / ref.norm()) < tol
    got_f = torch.cat([t.flatten() for t in hvp_func(f, [p.detach() for p in params], unflat(v_flat))])
    assert float((got_f - ref).norm() / ref.norm()) < tol


def test_hvp_operator_reuse_and_linearity():
    f, params, H, unflat = _problem(torch.float64, seed=1)
    op = HVP(lambda: f(*params), params)
    a, b = torch.randn(H.shape[0], dtype=torch.float64), torch.randn(H.shape[0], dtype=torch.float64)
    for v in (a, b, 2 * a - b):
        got = torch.cat([t.flatten() for t in op(unflat(v))])
        assert float((got - H @ v).norm() / (H @ v).norm()) < 1e-10
    # gradient exposed by the operator is the true gradient
    g_ref = torch.func.grad(lambda fl: f(*unflat(fl)))(torch.cat([p.detach().flatten() for p in params]))
    assert torch.allclose(torch.cat([g.flatten() for g in op.grads]).detach(), g_ref, atol=1e-12)


def test_hutchinson_trace_and_diag():
    f, params, H, unflat = _problem(torch.float64, seed=2)
    ref_tr = float(H.trace())
    # the estimator's standard deviation is sqrt(2 * sum_{i!=j} H_ij^2 / n): check against it (3 sigma)
    off2 = float((H ** 2).sum() - (H.diagonal() ** 2).sum())
    tr, se = hutchinson_trace(lambda: f(*params), params, n_probes=100, seed=0, return_std=True, method="hutchinson")
    assert abs(tr - ref_tr) < 3 * (2 * off2 / 100) ** 0.5
    assert abs(se - (2 * off2 / 100) ** 0.5) < 0.5 * (2 * off2 / 100) ** 0.5  # reported error is honest
    assert tr == hutchinson_trace(lambda: f(*params), params, n_probes=100, seed=0, method="hutchinson")  # deterministic
    tr1k = hutchinson_trace(lambda: f(*params), params, n_probes=1000, seed=1, method="hutchinson")
    assert abs(tr1k - ref_tr) / abs(ref_tr) < 0.05
    d = torch.cat([t.flatten() for t in hutchinson_diag(lambda: f(*params), params, n_probes=400, seed=3)])
    ref = H.diagonal()
    # the error per entry is the off-diagonal row norm / sqrt(probes)
    off = ((H ** 2).sum(1) - ref ** 2).sqrt() / 400 ** 0.5
    assert bool(((d - ref).abs() <= 4 * off + 1e-12).all())
    assert torch.corrcoef(torch.stack([d, ref]))[0, 1] > 0.9


def test_hutchinson_trace_within_5pct_diagonally_dominant():
    # weight-like Hessian: strong diagonal, weak couplings (what per-weight curvature looks like)
    g = torch.Generator().manual_seed(5)
    n = 200
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    c = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.01
    A = torch.diag(a) + (c + c.T) / 2
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    loss = lambda: 0.5 * w @ (A @ w) + torch.cos(w).sum() * 0.0
    tr = hutchinson_trace(loss, [w], n_probes=100, seed=0, method="hutchinson")
    assert abs(tr - float(A.trace())) / float(A.trace()) < 0.05
    d = hutchinson_diag(loss, [w], n_probes=100, seed=0)[0]
    assert float((d - A.diagonal()).abs().max()) < 0.1


def test_power_iteration_top_eigenvalue():
    f, params, H, unflat = _problem(torch.float64, seed=3)
    evals, evecs = torch.linalg.eigh(H)
    i = int(evals.abs().argmax())
    eig, vec = power_iteration(lambda: f(*params), params, iters=500, tol=1e-10, seed=0)
    assert abs(eig - float(evals[i])) / abs(float(evals[i])) < 0.01
    v = torch.cat([t.flatten() for t in vec])
    assert abs(float(v @ evecs[:, i])) > 0.99


# ------------------------------------------------------------------------------------------- Hutch++
def _mlp_logits(x, w1, b1, w2, b2, w3, b3):
    h = torch.tanh(x.to(w1.dtype) @ w1.T + b1)  # (B, 16)
    h = torch.tanh(h @ w2.T + b2)
    return h @ w3.T + b3  # (B, C)


def _attn_logits(x, wqkv, bqkv, wo, wc, heads=2):
    n, t, d = x.shape
    xx = x.to(wqkv.dtype)
    qkv = (xx @ wqkv.T + bqkv).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
    a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / (d // heads) ** 0.5, -1)  # (B, H, T, T)
    o = (a @ qkv[2]).transpose(1, 2).reshape(n, t, d) @ wo.T + xx  # (B, T, D)
    return o.mean(1) @ wc.T  # (B, C)


_NETS = {
    "mlp": (_mlp_logits, [(16, 10), (16,), (16, 16), (16,), (5, 16), (5,)], (16, 10)),
    "attention": (_attn_logits, [(24, 8), (24,), (8, 8), (4, 8)], (64, 5, 8)),
}


def _kl_problem(net, seed, dtype):
    """KL(dense || perturbed) of a random net at its dense point: the Gauss-Newton Hessian analyze uses."""
    fn, shapes, xs = _NETS[net]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*xs, generator=g, dtype=torch.float64)
    flat0 = torch.randn(sum(torch.Size(s).numel() for s in shapes), generator=g, dtype=torch.float64) * 0.7

    def unflat(flat):
        out, i = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            out.append(flat[i:i + n].reshape(s))
            i += n
        return out

    p0 = torch.log_softmax(fn(x, *unflat(flat0)), -1).detach()  # (B, C)

    def f(*ws):
        lp = torch.log_softmax(fn(x, *ws), -1)
        return (p0.exp().to(lp.dtype) * (p0.to(lp.dtype) - lp)).sum(-1).mean()

    H = torch.func.hessian(lambda fl: f(*unflat(fl)))(flat0)
    return f, [p.to(dtype).clone().requires_grad_(True) for p in unflat(flat0)], H


def _plain_rel_sd(H, m=100):
    off2 = float((H ** 2).sum() - (H.diagonal() ** 2).sum())
    return (2 * off2 / m) ** 0.5 / abs(float(H.trace()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hutchpp_within_5pct_at_100_probes(dtype):
    # Hessians that are NOT diagonally dominant (the diagonal holds < 20% of ||H||_F^2; plain Hutchinson's own
    # standard deviation is 3-10% at 100 probes): Hutch++ with the same 100 HVPs is within 5% for every seed
    # Relative-to-trace accuracy needs a trace that does not cancel: Hutch++ bounds the error by a fraction of the
    # nuclear norm sum|lambda_i|, which equals tr(H) for the PSD Gauss-Newton Hessians of the KL loss. The indefinite
    # cross-entropy problems are used where sum|lambda| <= 8 |tr H| (seed 2 of float32 / 4 of float64 has 16-18x:
    # there no 100-HVP estimator is within 5%; Hutch++ still errs 4-11% there against plain Hutchinson's 15-60%).
    problems = []
    for seed in (0, 1, 3):
        f, params, H, _ = _problem(dtype, seed)  # small MLP, labelled cross-entropy at a random point (indefinite)
        ev = torch.linalg.eigvalsh(H.double())
        assert float(ev.abs().sum()) < 8 * abs(float(ev.sum())) and float(ev.min()) < 0
        problems.append(("mlp_ce", f, params, H))
    for net in ("mlp", "attention"):
        for seed in (0, 1):
            problems.append((net + "_kl",) + _kl_problem(net, seed, dtype))
    errs = {"hutch++": [], "hutchinson": []}
    for name, f, params, H in problems:
        H = H.double()
        ref = float(H.trace())
        assert _plain_rel_sd(H) > 0.025, name  # not an easy case for plain Hutchinson
        assert float((H.diagonal() ** 2).sum() / (H ** 2).sum()) < 0.25, name  # not diagonally dominant
        for probe_seed in (0, 1):
            for method in errs:
                tr = hutchinson_trace(lambda: f(*params), params, n_probes=100, seed=probe_seed, method=method)
                errs[method].append(abs(tr - ref) / abs(ref))
            assert errs["hutch++"][-1] < 0.05, (name, probe_seed, errs["hutch++"][-1])
    mean = {m: sum(e) / len(e) for m, e in errs.items()}
    assert mean["hutch++"] < 0.5 * mean["hutchinson"], mean


def test_hutchpp_exact_on_low_rank_and_default():
    # rank-6 PSD quadratic: the k = 10 sketch spans the range, so the trace is exact (the deflated rest is 0)
    g = torch.Generator().manual_seed(7)
    U = torch.randn(50, 6, generator=g, dtype=torch.float64)
    A = U @ U.T
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)
    loss = lambda: 0.5 * w @ (A @ w)
    tr, se = hutchinson_trace(loss, [w], n_probes=30, seed=0, return_std=True)  # default method: hutch++
    assert abs(tr - float(A.trace())) < 1e-9 * float(A.trace())
    assert se < 1e-9 * float(A.trace())
    plain = hutchinson_trace(loss, [w], n_probes=30, seed=0, method="hutchinson")
    assert abs(plain - float(A.trace())) > 1e-3 * float(A.trace())  # plain Hutchinson is not exact here
    assert tr == hutchinson_trace(loss, [w], n_probes=30, seed=0)  # seeded: deterministic
    # fewer than 3 probes: plain Hutchinson
    assert hutchinson_trace(loss, [w], n_probes=2, seed=3) == hutchinson_trace(loss, [w], n_probes=2, seed=3, method="hutchinson")
    with pytest.raises(ValueError):
        hutchinson_trace(loss, [w], n_probes=30, method="nope")
