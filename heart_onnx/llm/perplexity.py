"""Perplexity of a causal LM on a text file (real weights only), strided windows like HF's guide.

``perplexity(model, tokenizer, text, max_len=512, stride=256, max_tokens=4096)``: the text is
tokenised, cut to ``max_tokens``, and scored in windows of ``max_len`` tokens moving by ``stride``;
only the tokens new to each window count, so every token is predicted once with up to
``max_len - stride`` tokens of context. Returns exp(mean negative log-likelihood).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import HeartError


def perplexity(model, tokenizer, text: str, max_len: int = 512, stride: int = 256, max_tokens: int = 4096,
               device: str = "cpu") -> dict:
    import torch

    if tokenizer is None:
        raise HeartError("perplexity needs a tokenizer: the checkpoint folder has no tokenizer files")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(device)  # (1, N)
    n = ids.shape[1]
    if n < 2:
        raise HeartError("the text file is too short for perplexity (fewer than 2 tokens)")
    max_len = min(max_len, getattr(model.config, "max_position_embeddings", max_len))
    nll, count, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, n, stride):
            end = min(begin + max_len, n)
            trg = end - prev_end  # tokens not scored yet
            window = ids[:, begin:end]
            logits = model(window).logits.float()  # (1, W, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = window[:, 1:]
            tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (1, W-1)
            k = min(trg, tok_lp.shape[1])
            nll -= float(tok_lp[:, -k:].sum())
            count += k
            prev_end = end
            if end == n:
                break
    return {"perplexity": math.exp(nll / count), "tokens": count, "max_len": max_len, "stride": stride}


def perplexity_file(model, tokenizer, path: str, **kw) -> dict:
    p = Path(path)
    if not p.exists():
        raise HeartError(f"text file not found: {p}")
    out = perplexity(model, tokenizer, p.read_text(errors="replace"), **kw)
    out["text_file"] = str(p)
    return out
