import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def demo_onnx_factory(tmp_path_factory):
    """Copy a (cached) dynamo export of the embedded demo ViT to the given path."""
    import shutil

    cache = {}

    def make(path):
        if "p" not in cache:
            import torch

            from heart_onnx.models.demo import INPUT_SHAPE, demo_vit
            from heart_onnx.models.export import export

            p = tmp_path_factory.mktemp("demo-onnx") / "demo_vit.onnx"
            export(demo_vit(), torch.randn(2, *INPUT_SHAPE), p)
            cache["p"] = p
        shutil.copy(cache["p"], path)
        return path

    return make
