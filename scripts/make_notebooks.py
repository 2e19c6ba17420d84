"""Write the notebooks in notebooks/ from the cell sources below (so they stay reviewable as code).

    python scripts/make_notebooks.py
"""
from pathlib import Path

import nbformat

NB = Path(__file__).resolve().parents[1] / "notebooks"

NOTEBOOKS = {
    "quickstart.ipynb": [
        ("md", "# heart-onnx quickstart: the embedded demo ViT\n\n"
               "A small ViT trained on scikit-learn's digits ships with heart-onnx. This notebook computes its "
               "Hessian sensitivities (heads and tokens), then lets you move the **loss budget** and see what would "
               "be pruned, the predicted loss change and the FLOPs. *Measure* gives the real loss change and accuracy "
               "on the held-out split; *Export pruned ONNX* writes the model; *Benchmark* times dense vs pruned on "
               "ONNX Runtime."),
        ("code", "from heart_onnx.jupyter import BudgetTuner\n\ntuner = BudgetTuner.from_demo()\ntuner"),
        ("code", "plan = tuner.plan\nprint('heads removed:', {l: list(h) for l, h in plan.heads.items()})\n"
                 "print('tokens kept:', [(s.after_layer, s.keep) for s in plan.tokens])\n"
                 "print(f'FLOPs: {plan.flops_pruned / plan.flops_dense:.1%} of dense, predicted loss change '\n"
                 "      f'{plan.predicted_loss_change:.4f} nats')"),
        ("code", "tuner.measure()"),
    ],
    "vit_image_folder.ipynb": [
        ("md", "# ViT/DeiT from an image folder\n\n"
               "Point heart-onnx at a folder of images in class sub-folders (`folder:/path`). Real weights load from a "
               "local path (`heart_onnx.models.zoo.load_local`: a Hugging Face `save_pretrained` folder or a timm state "
               "dict); nothing downloads. To keep this notebook self-contained and fast it writes a small folder of "
               "digits PNGs and uses a tiny timm DeiT with random weights: swap in `zoo.deit_b_16()` + `load_local(...)` "
               "and your own folder for the real thing. `N_IMAGES` and the model size are the small settings."),
        ("code", "import tempfile\nfrom pathlib import Path\n\nimport numpy as np\nfrom PIL import Image\n"
                 "from sklearn.datasets import load_digits\n\nN_IMAGES = 40\nfolder = Path(tempfile.mkdtemp()) / 'images'\n"
                 "digits = load_digits()\nfor i in range(N_IMAGES):\n"
                 "    d = folder / str(digits.target[i]); d.mkdir(parents=True, exist_ok=True)\n"
                 "    Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((32, 32)).convert('RGB').save(d / f'{i}.png')\n"
                 "sorted(p.name for p in folder.iterdir())"),
        ("code", "import heart_onnx as ho\nfrom heart_onnx.data import load_data\nfrom heart_onnx.models import zoo\n\n"
                 "model = zoo.tiny_deit(img=32, patch=8, depth=3, dim=64, heads=4).eval()\n"
                 "calib = load_data(f'folder:{folder}', model, batch_size=8)\n"
                 "sens = ho.analyze(model, calib, targets=('heads', 'tokens'))\nsens.head.round(5)"),
        ("code", "plan = ho.plan(sens, budget=float(np.quantile(ho.pareto(sens).loss, 0.5)))\n"
                 "print({l: list(h) for l, h in plan.heads.items()}, [(s.after_layer, s.keep) for s in plan.tokens])\n"
                 "x = next(iter(calib))[0]\nout = Path(tempfile.mkdtemp())\n"
                 "ho.export(model, x[:1], out / 'deit.onnx')\nho.prune(out / 'deit.onnx', plan, out / 'deit.pruned.onnx')\n"
                 "result = ho.verify(out / 'deit.pruned.onnx', model, plan)\nassert result, result\nresult"),
    ],
    "pythia_sweep.ipynb": [
        ("md", "# Pythia batch testing\n\n"
               "`heart_onnx.llm.sweep` measures time to first token, decode tokens/s, end-to-end latency, peak memory and "
               "(on Jetson or NVML GPUs) energy per token over a grid of backends, precisions, batch sizes and prompt "
               "lengths. Every finished cell is one JSONL line, so an interrupted sweep resumes where it stopped. Small "
               "settings here (a tiny GPT-NeoX, random weights); use `models=('pythia-70m', 'pythia-160m', ...)` or local "
               "checkpoint folders for the real grid, or the CLI: `heart-onnx sweep --models pythia-70m,pythia-160m ...`."),
        ("code", "import tempfile\nfrom heart_onnx.llm.sweep import SweepConfig, run_sweep\nfrom heart_onnx.llm.report import export_csv, plot_results\n\n"
                 "out = tempfile.mkdtemp()\ncfg = SweepConfig(models=('tiny:layers=2+hidden=32+heads=4',), backends=('torch-cpu', 'ort-cpu'),\n"
                 "                  batches=(1, 2), prompts=(8,), new_tokens=(4,), repeats=1)\n"
                 "summary = run_sweep(cfg, out, progress=False)\nsummary"),
        ("code", "csv = export_csv(f'{out}/results.jsonl', f'{out}/results.csv')\nprint(''.join(open(csv).readlines()[:9]))"),
        ("code", "from IPython.display import Image, display\n\nfor png in plot_results(f'{out}/results.jsonl', out):\n    display(Image(str(png)))"),
    ],
    "cnn_pair_merging.ipynb": [
        ("md", "# CAMP-HiVe weight-pair merging on a CNN\n\n"
               "Instead of zeroing the least significant weights, each is merged into a significant partner with a "
               "curvature-aware coefficient. Here on the embedded demo CNN (digits): 50% unstructured sparsity, merging "
               "vs magnitude pruning vs Hessian pruning without merging vs the paper's half rule, then ONNX surgery."),
        ("code", "import numpy as np\nimport torch\nfrom heart_onnx.data import load_data\nfrom heart_onnx.models.demo import demo_cnn, digits_split\n"
                 "from heart_onnx.models.merge_weights import merged\nfrom heart_onnx.pairing import entries, make_merge, supports\n"
                 "from heart_onnx.sensitivity.pairs import weight_sensitivities\n\n"
                 "model = demo_cnn()\n_, _, x_test, y_test = digits_split()\n"
                 "calib = load_data('digits', model, n=64, batch_size=32, split='calib')\n"
                 "ents = weight_sensitivities(model, calib)\nlen(ents)"),
        ("code", "def accuracy(m):\n    with torch.no_grad():\n        return float((m(x_test).argmax(-1) == y_test).float().mean())\n\n"
                 "rows = {'dense': accuracy(model)}\nfor method in ('camp', 'magnitude', 'hessian', 'half'):\n"
                 "    merges = [make_merge(e, 'unstructured', 0.5, method=method, name=n) for n, e in ents.items()\n"
                 "              if supports(e, 'unstructured') and e['shape'][1] > 3]\n"
                 "    rows[method] = accuracy(merged(model, merges))\nrows"),
    ],
}


def main() -> None:
    NB.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        for kind, src in cells:
            nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
        (NB / name).write_text(nbformat.writes(nb))
        print("wrote", NB / name)


if __name__ == "__main__":
    main()
