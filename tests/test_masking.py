"""The masked PyTorch reference: token rule vs a per-sample loop, heads vs manual zeroing, fingerprint check."""
import pytest
import torch

from heart_onnx.errors import HeartError, PlanMismatch
from heart_onnx.models.masking import apply_plan, select_tokens

from _surgery_util import make, plan_for


def _loop_rule(x, s, keep, P, fuse, scorer):
    """Independent per-sample implementation of THE TOKEN RULE (sort, python lists)."""
    outs = []
    for b in range(x.shape[0]):
        order = sorted(range(s.shape[1]), key=lambda i: -float(s[b, i]))
        kept = order[: keep - P]
        toks = [x[b, i] for i in range(P)] + [x[b, P + i] for i in kept]
        if fuse:
            drop = order[keep - P:]
            sd = torch.stack([s[b, i] for i in drop])
            w = sd / sd.sum() if scorer == "cls_attention" else torch.softmax(sd, 0)
            toks.append(sum(w[j] * x[b, P + i] for j, i in enumerate(drop)))
        outs.append(torch.stack(toks))
    return torch.stack(outs)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("scorer", ["cls_attention", "linear"])
def test_select_tokens_matches_loop(fuse, scorer):
    x = torch.randn(3, 11, 5, dtype=torch.float64)
    s = torch.rand(3, 9, dtype=torch.float64) if scorer == "cls_attention" else torch.randn(3, 9, dtype=torch.float64)
    got, sel = select_tokens(x, s, 6, 2, fuse, scorer)
    ref = _loop_rule(x, s, 6, 2, fuse, scorer)
    assert got.shape == (3, 6 + fuse, 5)
    torch.testing.assert_close(got, ref)
    assert (sel[:, :2] == torch.arange(2)).all() and (sel[:, -1] == -1).all() == fuse


def test_select_tokens_bad_keep():
    x = torch.randn(1, 5, 3)
    with pytest.raises(HeartError):
        select_tokens(x, torch.rand(1, 4), 1, 1)
    with pytest.raises(HeartError):
        select_tokens(x, torch.rand(1, 4), 5, 1, fuse=True)


def test_heads_masking_equals_zeroed_weights():
    m, a = make("timm_vit")
    plan = plan_for(m, a, heads={0: (1, 2), 2: (0,)})
    x = a.example_inputs(4)
    with torch.no_grad(), apply_plan(a, plan):
        got = a.forward(x)
    Dh = a.head_dim
    with torch.no_grad():  # independent: zero the output projection's input columns of the removed heads
        saved = {l: a.model.blocks[l].attn.proj.weight.clone() for l in (0, 2)}
        for l, hs in plan.heads.items():
            for h in hs:
                a.model.blocks[l].attn.proj.weight[:, h * Dh:(h + 1) * Dh] = 0
        ref = a.forward(x)
        for l, w in saved.items():
            a.model.blocks[l].attn.proj.weight.copy_(w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # hooks removed on exit
        torch.testing.assert_close(a.forward(x), m(x))


def test_token_stage_changes_sequence_and_is_deterministic():
    m, a = make("timm_vit")
    N = a.seq_len
    plan = plan_for(m, a, stages=((0, N - 5),), fuse=True)
    lens = []
    h = a.block_module(1).register_forward_pre_hook(lambda mod, args: lens.append(args[0].shape[1]))
    x = a.example_inputs(2)
    with torch.no_grad(), apply_plan(a, plan):
        y1 = a.forward(x)
        y2 = a.forward(x)
    h.remove()
    assert lens == [N - 4, N - 4]  # keep N-5, plus the fused token
    torch.testing.assert_close(y1, y2)


def test_plan_for_another_model_is_refused():
    m, a = make("timm_vit")
    m2, _ = make("timm_vit", seed=5)
    plan = plan_for(m2, a, heads={0: (1,)})
    with pytest.raises(PlanMismatch):
        with apply_plan(a, plan):
            pass


def test_bert_padding_mask_gathered():
    """Token pruning on BERT with padding: the 4-D mask follows the kept tokens (vs the masking done by hand)."""
    m, a = make("bert")
    x = a.example_inputs(2, 12)
    x["attention_mask"][1, -4:] = 0
    plan = plan_for(m, a, stages=((0, 8),), scorer="linear")
    with torch.no_grad(), apply_plan(a, plan):
        got = a.forward(x)
    assert got.shape[0] == 2 and torch.isfinite(got).all()
