"""hvp.py against the exact Hessian from torch.func.hessian on a small MLP."""
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
    tr, se = hutchinson_trace(lambda: f(*params), params, n_probes=100, seed=0, return_std=True)
    assert abs(tr - ref_tr) < 3 * (2 * off2 / 100) ** 0.5
    assert abs(se - (2 * off2 / 100) ** 0.5) < 0.5 * (2 * off2 / 100) ** 0.5  # reported error is honest
    assert tr == hutchinson_trace(lambda: f(*params), params, n_probes=100, seed=0)  # deterministic
    tr1k = hutchinson_trace(lambda: f(*params), params, n_probes=1000, seed=1)
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
    tr = hutchinson_trace(loss, [w], n_probes=100, seed=0)
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
