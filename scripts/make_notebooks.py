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
