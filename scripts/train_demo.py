"""Train the embedded demo models (ViT and ResNet) on scikit-learn's digits and write their weights.

    OMP_NUM_THREADS=1 python scripts/train_demo.py --out heart_onnx/models/weights

Writes ``demo_vit.pt`` and ``demo_cnn.pt`` (plain state dicts) and ``demo.json`` (held-out accuracy on
the fixed split ``heart_onnx.models.demo.DEMO_SPLIT``, seed, epochs, versions, time, file hashes).
Seeded and single-threaded by default, so a rerun on the same torch version reproduces the numbers.

Protocol (training split only, 1047 images: the 300 ``val`` images used for calibration and the 450
test images are never trained on; seed 0; torch single-threaded):
- ViT: 100 epochs, AdamW lr 1.5e-3, weight decay 0.05 (not on norms, biases, pos_embed, cls_token),
  batch 32, no label smoothing, half of the images shifted by a random -1..1 pixel in x and y.
- CNN: 60 epochs, AdamW lr 3e-3, weight decay 5e-4, batch 64, label smoothing 0.1, every image shifted.
- Both: linear warm-up (5 epochs) then cosine decay to 0; shifted-in pixels are background (0).
No early stopping and no model selection on the val or test split: the weights are those after the last
epoch (``--monitor`` only prints accuracies while training).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heart_onnx.models import demo  # noqa: E402

BACKGROUND = (0.0 - demo.DIGITS_MEAN) / demo.DIGITS_STD  # normalised value of a 0 pixel


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image (B, C, H, W) by a random integer in [-max_shift, max_shift] along H and W."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=BACKGROUND)  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
    bi = torch.arange(b)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 100, lr: float = 2e-3,
                     weight_decay: float = 0.05, batch_size: int = 64, warmup: int = 5, label_smoothing: float = 0.1,
                     max_shift: int = 1, shift_prob: float = 1.0, seed: int = 0, log_every: int = 0,
                     on_epoch: Callable[[int, nn.Module], None] | None = None) -> dict:
    """Train ``model`` in place on ``(x (N,C,H,W), y (N,))``; return ``{"epochs", "final_loss", "seconds"}``.

    Defaults: ``epochs=100, lr=2e-3, weight_decay=0.05, batch_size=64, warmup=5 (epochs),
    label_smoothing=0.1, max_shift=1 (pixels), shift_prob=1.0 (fraction of images shifted), seed=0,
    log_every=0 (silent), on_epoch=None`` (called as ``on_epoch(epoch, model)`` after each epoch, in
    train mode; for monitoring only). AdamW with linear warm-up then cosine decay.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    warm = min(warmup * steps_per_epoch, max(total - 1, 0))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    model.train()
    loss_val = float("nan")
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        running, seen = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]  # (B, C, H, W)
            if max_shift > 0 and shift_prob > 0:
                shifted = random_shift(xb, gen, max_shift)
                pick = torch.rand(len(idx), generator=gen) < shift_prob  # (B,)
                xb = torch.where(pick[:, None, None, None], shifted, xb)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
        loss_val = running / max(seen, 1)
        if log_every and (ep + 1) % log_every == 0:
            print(f"  epoch {ep + 1:4d}/{epochs}  loss {loss_val:.4f}", flush=True)
        if on_epoch is not None:
            on_epoch(ep + 1, model)
            model.train()
    model.eval()
    return {"epochs": epochs, "final_loss": loss_val, "seconds": time.perf_counter() - t0}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="heart_onnx/models/weights", help="output folder (default heart_onnx/models/weights)")
    ap.add_argument("--models", default="vit,cnn", help="which models to train (default vit,cnn)")
    ap.add_argument("--vit-epochs", type=int, default=100, help="default 100")
    ap.add_argument("--cnn-epochs", type=int, default=60, help="default 60")
    ap.add_argument("--seed", type=int, default=0, help="default 0")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--monitor", action="store_true", help="also print train/test accuracy every --log-every epochs "
                    "(display only: the shipped weights are always those after the last epoch)")
    ap.add_argument("--log-every", type=int, default=10, help="print the loss every N epochs (default 10, 0 = silent)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = demo.digits_split()
    x_va, y_va = demo.digits_val()
    meta_path = out / demo.META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update({
        "format": "heart-onnx-demo-weights",
        "split": demo.DEMO_SPLIT,
        "input": {"name": demo.INPUT_NAME, "shape": [None, *demo.INPUT_SHAPE], "dtype": "float32",
                  "normalisation": demo.DEMO_SPLIT["normalisation"]},
        "seed": args.seed,
        "torch": torch.__version__,
    })
    try:
        import timm

        meta["timm"] = timm.__version__
    except ImportError:
        pass
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    recipes = {
        "vit": (demo.build_vit, demo.VIT_WEIGHTS, demo.VIT_CONFIG,
                dict(epochs=args.vit_epochs, lr=1.5e-3, weight_decay=0.05, batch_size=32, label_smoothing=0.0, shift_prob=0.5)),
        "cnn": (demo.build_cnn, demo.CNN_WEIGHTS, demo.CNN_CONFIG,
                dict(epochs=args.cnn_epochs, lr=3e-3, weight_decay=5e-4, batch_size=64, label_smoothing=0.1, shift_prob=1.0)),
    }
    for name in wanted:
        if name not in recipes:
            ap.error(f"unknown model {name!r}: choose from {sorted(recipes)}")
        build, fname, config, hp = recipes[name]
        torch.manual_seed(args.seed)
        model = build()
        print(f"training demo {name} ({sum(p.numel() for p in model.parameters())} parameters) for {hp['epochs']} epochs", flush=True)
        monitor = None
        if args.monitor:
            def monitor(ep: int, m: nn.Module) -> None:  # progress display only: never used to pick weights
                if args.log_every and ep % args.log_every == 0:
                    print(f"  epoch {ep:4d}: train acc {demo.accuracy(m.eval(), x_tr, y_tr):.4f}  "
                          f"test acc {demo.accuracy(m, x_te, y_te):.4f}", flush=True)
        info = train_classifier(model, x_tr, y_tr, seed=args.seed, log_every=args.log_every, on_epoch=monitor, **hp)
        acc_te = demo.accuracy(model, x_te, y_te)
        acc_tr = demo.accuracy(model, x_tr, y_tr)
        acc_va = demo.accuracy(model, x_va, y_va)
        path = out / fname
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
        meta[name] = {
            "weights": fname, "sha256": _sha(path), "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "test_accuracy": acc_te, "test_correct": round(acc_te * len(y_te)), "n_test": len(y_te),
            "train_accuracy": acc_tr, "val_accuracy": acc_va, "n_val": len(y_va), "epochs": hp["epochs"], "lr": hp["lr"], "weight_decay": hp["weight_decay"],
            "batch_size": hp["batch_size"], "label_smoothing": hp["label_smoothing"],
            "shift_prob": hp["shift_prob"], "final_train_loss": info["final_loss"], "train_seconds": round(info["seconds"], 1),
            "threads": args.threads,
            "command": "OMP_NUM_THREADS=1 python scripts/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        print(f"  {name}: test accuracy {acc_te:.4f} ({meta[name]['test_correct']}/{len(y_te)}), "
              f"val {acc_va:.4f}, train {acc_tr:.4f}, {info['seconds']:.0f} s", flush=True)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
