"""Write a budget-tuning notebook for a model (used by the JupyterLab "Open budget tuner" command)."""
from __future__ import annotations

from pathlib import Path

from .._deps import require
from ..fileio import write_text_atomic


def _cells(model_path: Path | None, root: Path) -> list[tuple[str, str]]:
    if model_path is None:
        return [
            ("markdown", "# heart-onnx budget tuner: embedded demo ViT\n\n"
             "Move the loss budget to see which heads and tokens would be pruned, the predicted loss change and "
             "the FLOPs. *Measure* computes the real loss change and accuracy on the held-out digits split; "
             "*Export* writes the pruned ONNX model."),
            ("code", "from heart_onnx.jupyter import BudgetTuner\n\ntuner = BudgetTuner.from_demo()\ntuner"),
            ("code", "tuner.plan  # the current Plan; tuner.plan.save('plan.json') keeps it"),
        ]
    rel = model_path.name
    sens = model_path.with_suffix(".sens.npz").name
    return [
        ("markdown", f"# heart-onnx budget tuner: `{rel}`\n\n"
         f"The tuner reads the model's sensitivities from `{sens}` next to it. If that file is missing, make it "
         f"from the PyTorch model first: `heart-onnx analyze --model ... --data ... -o {sens}`."),
        ("code", f"from heart_onnx.jupyter import BudgetTuner\n\ntuner = BudgetTuner.for_onnx({rel!r})\ntuner"),
        ("code", "tuner.plan  # the current Plan; tuner.plan.save('plan.json') keeps it"),
    ]


def write_tuner_notebook(model_path: Path | None, directory: Path, root: Path) -> Path:
    """Create ``<model stem>.tuner.ipynb`` (or ``heart-onnx-demo.tuner.ipynb``) in ``directory``; never overwrite."""
    nbformat = require("nbformat", "the budget-tuner notebook")
    stem = model_path.stem if model_path is not None else "heart-onnx-demo"
    target = directory / f"{stem}.tuner.ipynb"
    i = 1
    while target.exists():
        target = directory / f"{stem}.tuner-{i}.ipynb"
        i += 1
    nb = nbformat.v4.new_notebook()
    for kind, src in _cells(model_path, root):
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    write_text_atomic(target, nbformat.writes(nb))
    return target
