"""heart_onnx.data: every source yields (inputs, labels) batches equal to an independent reading of the data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from heart_onnx import data
from heart_onnx.errors import HeartError
from heart_onnx.models import demo


def _sklearn_split():
    """Independent reference for the demo split, straight from scikit-learn."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.images, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return x_tr, y_tr, x_te, y_te


# ---------------------------------------------------------------------------------------- digits
def _sklearn_val():
    """Independent reference of the val carve-out: indices into sklearn's stratified train split."""
    from sklearn.model_selection import train_test_split

    _, y_tr, _, _ = _sklearn_split()
    return train_test_split(np.arange(len(y_tr)), test_size=300, random_state=0, stratify=y_tr)


def test_digits_split_matches_sklearn():
    x_tr, y_tr, x_te, y_te = demo.digits_split()
    r_xtr, r_ytr, r_xte, r_yte = _sklearn_split()
    fit, _ = _sklearn_val()
    assert x_tr.shape == (1047, 1, 8, 8) and x_te.shape == (450, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    np.testing.assert_allclose(x_tr[:, 0].numpy(), (r_xtr[fit] / 16 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(x_te[:, 0].numpy(), (r_xte / 16 - 0.5) / 0.5, atol=1e-6)  # test split unchanged
    np.testing.assert_array_equal(y_tr.numpy(), r_ytr[fit])
    np.testing.assert_array_equal(y_te.numpy(), r_yte)
    raw = demo.digits_split(normalise=False)[0]
    np.testing.assert_array_equal(raw[:, 0].numpy(), r_xtr[fit])


def test_digits_val_is_stratified_and_disjoint_from_train_and_test():
    xv, yv = demo.digits_val()
    x_tr, y_tr, x_te, _ = demo.digits_split()
    r_xtr, r_ytr, _, _ = _sklearn_split()
    _, val = _sklearn_val()
    assert xv.shape == (300, 1, 8, 8)
    np.testing.assert_array_equal(demo.digits_val(normalise=False)[0][:, 0].numpy(), r_xtr[val])
    np.testing.assert_array_equal(yv.numpy(), r_ytr[val])
    counts = torch.bincount(yv, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 31  # stratified: 300 / 10 classes
    xc, yc = demo.digits_calibration()
    assert torch.equal(xc, xv) and torch.equal(yc, yv)  # calib = val
    # val + train = sklearn's 1347 training images (as multisets of rows), none of them a test image
    rows = lambda a: sorted(map(bytes, a.reshape(len(a), -1).numpy().astype(np.float32)))
    assert rows(torch.cat([x_tr, xv])) == rows(torch.from_numpy((r_xtr[:, None] / 16 - 0.5) / 0.5).float())
    assert len(y_tr) + len(yv) == 1347


@pytest.mark.parametrize("spec,split,n_expected", [("digits", None, 300), ("digits:test", None, 450),
                                                   ("digits", "train", 1047), ("digits:calib", "calib", 300),
                                                   ("digits:val", None, 300), ("digits", "val", 300)])
def test_digits_loader_splits(spec, split, n_expected):
    loader = data.load_data(spec, split=split, batch_size=100)
    x, y = data.concat_batches(loader)
    assert x.shape == (n_expected, 1, 8, 8) and y.shape == (n_expected,)
    ref = {"test": demo.digits_split()[2:], "train": demo.digits_split()[:2], "calib": demo.digits_val(),
           "val": demo.digits_val()}
    which = spec.partition(":")[2] or split or "calib"
    assert torch.equal(x, ref[which][0]) and torch.equal(y, ref[which][1])
    first = next(iter(loader))
    assert isinstance(first, tuple) and len(first) == 2 and first[0].shape[0] == min(100, n_expected)


def test_digits_resized_for_other_models():
    """digits fed to a 3x16x16 ImageNet-normalised model: bilinear resize + channel repeat + normalise."""
    loader = data.load_data("digits:test", input_shape=(3, 16, 16), n=7, batch_size=4)
    x, y = data.concat_batches(loader)
    assert x.shape == (7, 3, 16, 16) and len(y) == 7
    raw = torch.from_numpy(_sklearn_split()[2][:7]).float()[:, None] / 16  # (7, 1, 8, 8) on 0..1
    up = nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)
    for c, (m, s) in enumerate(zip(data.IMAGENET_MEAN, data.IMAGENET_STD)):
        torch.testing.assert_close(x[:, c], (up[:, 0] - m) / s, atol=1e-5, rtol=0)


def test_digits_n_and_split_conflicts():
    x, _ = data.concat_batches(data.load_data("digits:test", n=10))
    assert torch.equal(x, demo.digits_split()[2][:10])
    with pytest.raises(HeartError, match="split"):
        data.load_data("digits:test", split="train")
    with pytest.raises(HeartError, match="splits"):
        data.load_data("digits:holdout")
    with pytest.raises(HeartError, match="tokens"):
        data.load_data("digits", input_shape=(16,), vocab_size=100)


# ---------------------------------------------------------------------------------------- folder
def _write_digit_pngs(root: Path, count: int, labelled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    _, _, x_te, y_te = _sklearn_split()
    pix = np.round(x_te[:count] * 255 / 16).astype(np.uint8)  # (count, 8, 8)
    for i in range(count):
        d = root / str(int(y_te[i])) if labelled else root
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pix[i], mode="L").save(d / f"img{i:03d}.png")
    return pix, y_te[:count]


def test_folder_labelled_matches_digits(tmp_path):
    pix, labels = _write_digit_pngs(tmp_path, 30)
    loader = data.load_data(f"folder:{tmp_path}", model=demo.build_vit(), batch_size=8)
    x, y = data.concat_batches(loader)
    assert x.shape == (30, 1, 8, 8) and y.dtype == torch.int64
    # order: sorted class folders then sorted file names; compare each image to its PNG source
    files = loader.dataset.files
    for k, f in enumerate(files):
        i = int(f.stem[3:])
        assert int(y[k]) == int(labels[i]) == int(f.parent.name)
        np.testing.assert_allclose(x[k, 0].numpy(), (pix[i] / 255 - 0.5) / 0.5, atol=1e-6)
    assert loader.dataset.classes == sorted({str(int(v)) for v in labels})


def test_folder_named_classes_rgb_resize(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    imgs = {}
    for cls in ("zebra", "apple"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            a = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(a, mode="RGB").save(tmp_path / cls / f"{i}.png")
            imgs[(cls, i)] = a
    loader = data.load_data(str(tmp_path), input_shape=(3, 5, 6), mean=0.0, std=1.0, batch_size=4)
    x, y = data.concat_batches(loader)
    assert x.shape == (6, 3, 5, 6)
    assert loader.dataset.classes == ["apple", "zebra"] and y.tolist() == [0, 0, 0, 1, 1, 1]
    ref = np.asarray(Image.fromarray(imgs[("zebra", 2)]).resize((6, 5), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(x[5].permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_folder_flat_unlabelled_and_subset(tmp_path):
    _write_digit_pngs(tmp_path, 12, labelled=False)
    loader = data.load_data(f"folder:{tmp_path}", input_shape=(1, 8, 8), n=5, batch_size=2)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1] and all(b[1] is None for b in batches)
    again = data.concat_batches(data.load_data(f"folder:{tmp_path}", input_shape=(1, 8, 8), n=5))[0]
    assert torch.equal(torch.cat([b[0] for b in batches]), again)  # seeded subset is reproducible


def test_folder_errors(tmp_path):
    with pytest.raises(HeartError, match="does not exist"):
        data.load_data(f"folder:{tmp_path / 'nope'}", input_shape=(1, 8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeartError, match="no images"):
        data.load_data(f"folder:{tmp_path / 'empty'}", input_shape=(1, 8, 8))
    mixed = tmp_path / "mixed"
    _write_digit_pngs(mixed, 3)
    _write_digit_pngs(mixed, 2, labelled=False)
    with pytest.raises(HeartError, match="both images and class"):
        data.load_data(f"folder:{mixed}", input_shape=(1, 8, 8))
    bad = tmp_path / "bad" / "0"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"not a png")
    loader = data.load_data(f"folder:{bad.parent}", input_shape=(1, 8, 8))
    with pytest.raises(HeartError, match="cannot read image"):
        next(iter(loader))
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(HeartError, match="not a folder"):
        data.load_data(f"folder:{f}", input_shape=(1, 8, 8))


# ------------------------------------------------------------------------------------------- npz
def test_npz_images_with_and_without_labels(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 1, 8, 8)).astype(np.float64)
    y = np.arange(20) % 10
    np.savez(tmp_path / "a.npz", x=x, y=y)
    xb, yb = data.concat_batches(data.load_data(f"npz:{tmp_path / 'a.npz'}", model=demo.build_cnn(), input_shape=(1, 8, 8)))
    assert xb.dtype == torch.float32
    np.testing.assert_allclose(xb.numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(yb.numpy(), y)
    np.savez(tmp_path / "b.npz", x=x[:, 0])  # (N, H, W) accepted for one channel, no labels
    loader = data.load_data(f"npz:{tmp_path / 'b.npz'}", input_shape=(1, 8, 8), n=6, batch_size=4)
    xs, ys = data.concat_batches(loader)
    assert ys is None and xs.shape == (6, 1, 8, 8)
    rows = [int(np.argmin(np.abs(x[:, 0] - r[0].numpy()).sum((1, 2)))) for r in xs]
    assert rows == sorted(rows) and len(set(rows)) == 6  # seeded subset, in file order
    np.testing.assert_allclose(xs.numpy(), x[rows].astype(np.float32))


def test_npz_tokens(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50, size=(9, 12))
    mask = np.ones_like(ids)
    mask[:, -3:] = 0
    np.savez(tmp_path / "t.npz", x=ids, attention_mask=mask)
    inputs, labels = data.concat_batches(data.load_data(f"npz:{tmp_path / 't.npz'}", input_shape=(12,), vocab_size=50, batch_size=4))
    assert labels is None and set(inputs) == {"input_ids", "attention_mask"}
    np.testing.assert_array_equal(inputs["input_ids"].numpy(), ids)
    np.testing.assert_array_equal(inputs["attention_mask"].numpy(), mask)
    with pytest.raises(HeartError, match=r"\[0, 40\)"):
        data.load_data(f"npz:{tmp_path / 't.npz'}", input_shape=(12,), vocab_size=40)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 1, 8, 8)))
    with pytest.raises(HeartError, match="no array 'x'"):
        data.load_data(f"npz:{tmp_path / 'nox.npz'}", input_shape=(1, 8, 8))
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 3, 8, 8)))
    with pytest.raises(HeartError, match=r"\(N, 1, 8, 8\)"):
        data.load_data(f"npz:{tmp_path / 'shape.npz'}", input_shape=(1, 8, 8))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(HeartError, match="pickle"):
        data.load_data(f"npz:{tmp_path / 'obj.npz'}", input_shape=(1, 8, 8))
    np.savez(tmp_path / "y.npz", x=np.zeros((2, 1, 8, 8)), y=np.array([0.5, 1.0]))
    with pytest.raises(HeartError, match="integer class labels"):
        data.load_data(f"npz:{tmp_path / 'y.npz'}", input_shape=(1, 8, 8))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(HeartError, match="not a valid .npz"):
        data.load_data(f"npz:{tmp_path / 'junk.npz'}", input_shape=(1, 8, 8))
    with pytest.raises(HeartError, match="does not exist"):
        data.load_data(f"npz:{tmp_path / 'missing.npz'}", input_shape=(1, 8, 8))


# ------------------------------------------------------------------------------------------ text
def test_text_byte_fallback(tmp_path):
    text = "Deployment engineers prune heads. Ünïcödé bytes too! " * 20
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    raw = list(text.encode("utf-8"))
    loader = data.load_data(f"text:{tmp_path / 'a.txt'}", input_shape=(32,), vocab_size=1000, batch_size=5)
    inputs, labels = data.concat_batches(loader)
    n_win = len(raw) // 32
    assert labels is None and inputs["input_ids"].shape == (n_win, 32) and inputs["input_ids"].dtype == torch.int64
    assert inputs["input_ids"].flatten().tolist() == raw[: n_win * 32]
    assert bool((inputs["attention_mask"] == 1).all())
    small = data.concat_batches(data.load_data(f"text:{tmp_path / 'a.txt'}", seq_len=16, vocab_size=100, n=3))[0]
    assert small["input_ids"].shape == (3, 16)
    assert small["input_ids"].flatten().tolist() == [b % 100 for b in raw[:48]]
    # no model and no vocab: bytes as they are (vocab 256), default window 128
    default = data.concat_batches(data.load_data(f"text:{tmp_path / 'a.txt'}"))[0]
    assert default["input_ids"].shape == (len(raw) // 128, 128)


def _tiny_tokenizer_dir(tmp_path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in "the quick brown fox jumps over lazy dog".split():
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    out = tmp_path / "tok"
    fast.save_pretrained(out)
    return out


def test_text_with_local_tokenizer(tmp_path):
    tok_dir = _tiny_tokenizer_dir(tmp_path)
    words = "the quick brown fox jumps over the lazy dog".split()
    (tmp_path / "t.txt").write_text(" ".join(words * 3) + " zebra")
    loader = data.load_data(f"text:{tmp_path / 't.txt'}", input_shape=(4,), vocab_size=20, tokenizer=str(tok_dir))
    ids = data.concat_batches(loader)[0]["input_ids"]
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    expected = [vocab[w] for w in words * 3] + [vocab["[UNK]"]]
    assert ids.shape == (7, 4) and ids.flatten().tolist() == expected[:28]
    with pytest.raises(HeartError, match="vocabulary"):
        data.load_data(f"text:{tmp_path / 't.txt'}", input_shape=(4,), vocab_size=5, tokenizer=str(tok_dir))
    with pytest.raises(HeartError, match="tokenizer folder"):
        data.load_data(f"text:{tmp_path / 't.txt'}", input_shape=(4,), vocab_size=20, tokenizer=str(tmp_path / "nope"))


def test_text_errors(tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(HeartError, match="fewer than one window"):
        data.load_data(f"text:{tmp_path / 'short.txt'}", input_shape=(8,), vocab_size=300)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc" * 10)
    with pytest.raises(HeartError, match="UTF-8"):
        data.load_data(f"text:{tmp_path / 'bin.txt'}", input_shape=(4,), vocab_size=300)
    with pytest.raises(HeartError, match="images"):
        data.load_data(f"text:{tmp_path / 'short.txt'}", input_shape=(1, 8, 8))
    with pytest.raises(HeartError, match="does not exist"):
        data.load_data(f"text:{tmp_path / 'missing.txt'}", input_shape=(4,), vocab_size=300)


# ---------------------------------------------------------------------------------------- random
def test_random_inputs_seeded():
    a = data.concat_batches(data.load_data("random", input_shape=(1, 8, 8), n=10, batch_size=3))
    b = data.concat_batches(data.load_data("random", input_shape=(1, 8, 8), n=10, batch_size=5))
    assert a[1] is None and a[0].shape == (10, 1, 8, 8) and torch.equal(a[0], b[0])
    ref = torch.randn((10, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], ref)
    c = data.concat_batches(data.load_data("random", input_shape=(1, 8, 8), n=10, seed=1))[0]
    assert not torch.equal(a[0], c)
    toks = data.concat_batches(data.load_data("random", input_shape=(7,), vocab_size=11, n=4))[0]
    assert toks["input_ids"].shape == (4, 7) and int(toks["input_ids"].max()) < 11
    assert len(data.load_data("random", input_shape=(1, 8, 8)).dataset) == data.DEFAULT_RANDOM_N


def test_shape_from_adapter_like_model():
    class FakeAdapter:
        def __init__(self, model):
            self.model = model

        def example_inputs(self, batch=1, seq_len=None):
            return torch.zeros(batch, 3, 12, 12)

    x, _ = data.concat_batches(data.load_data("random", FakeAdapter(nn.Identity()), n=2))
    assert x.shape == (2, 3, 12, 12)

    class FakeLM:
        def __init__(self):
            self.model = nn.Identity()
            self.model.config = type("C", (), {"vocab_size": 33})()

        def example_inputs(self, batch=1, seq_len=None):
            return {"input_ids": torch.zeros(batch, seq_len or 9, dtype=torch.long)}

    t, _ = data.concat_batches(data.load_data("random", FakeLM(), n=3))
    assert t["input_ids"].shape == (3, data.DEFAULT_SEQ_LEN) and int(t["input_ids"].max()) < 33
    spec = data.input_spec(FakeLM(), seq_len=5)
    assert spec == data.InputSpec("tokens", (5,), vocab_size=33)
    short = FakeLM()
    short.model.config.max_position_embeddings = 20
    assert data.input_spec(short).shape == (20,)


def test_text_windows_run_through_a_real_lm_adapter(tmp_path):
    """End to end: text windows from a tiny GPT-NeoX's geometry feed its adapter; logits match a direct call."""
    pytest.importorskip("transformers")
    from heart_onnx.models.registry import adapt
    from heart_onnx.models.zoo import tiny_pythia

    model = tiny_pythia().eval()  # vocab 128, 64 positions
    adapter = adapt(model)
    (tmp_path / "t.txt").write_text("pythia reads bytes in this fallback. " * 20)
    loader = data.load_data(f"text:{tmp_path / 't.txt'}", adapter, n=3, batch_size=2)
    inputs, labels = next(iter(loader))
    assert labels is None and inputs["input_ids"].shape == (2, 64)  # capped by max_position_embeddings
    assert int(inputs["input_ids"].max()) < 128
    with torch.no_grad():
        got = adapter.forward(inputs)
        ref = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert got.shape == (2, 64, 128)
    torch.testing.assert_close(got, ref)


# --------------------------------------------------------------------------------- spec, helpers
def test_spec_errors_and_parsing(tmp_path):
    assert data.parse_spec("digits:test") == ("digits", "test")
    assert data.parse_spec("npz:C:/x.npz") == ("npz", "C:/x.npz")
    with pytest.raises(HeartError, match="unknown data spec"):
        data.load_data("imagenet", input_shape=(1, 8, 8))
    with pytest.raises(HeartError, match="empty data spec"):
        data.load_data("  ")
    with pytest.raises(HeartError, match="needs a path"):
        data.load_data("folder:", input_shape=(1, 8, 8))
    with pytest.raises(HeartError, match="input shape"):
        data.load_data("random")
    with pytest.raises(HeartError, match="channels"):
        data.load_data("random", input_shape=(3, 4, 4), mean=(0.1, 0.2))
    with pytest.raises(HeartError, match="batch_size"):
        data.load_data("digits", batch_size=0)
    with pytest.raises(HeartError, match="n must be"):
        data.load_data("digits", n=0)


def test_split_batch_conventions():
    x = torch.zeros(2, 3)
    y = torch.ones(2, dtype=torch.long)
    assert data.split_batch(x) == (x, None)
    assert data.split_batch((x,))[1] is None
    assert data.split_batch((x, y))[1] is y
    inputs, labels = data.split_batch({"input_ids": x, "labels": y})
    assert set(inputs) == {"input_ids"} and labels is y
    with pytest.raises(HeartError, match="cannot read a batch"):
        data.split_batch((x, y, y))


def test_demo_models_declare_their_input():
    """A conv net has no fixed input size: the demo CNN declares (1, 8, 8), so digits are not resized."""
    for model in (demo.build_cnn(), demo.build_vit()):
        x, y = data.concat_batches(data.load_data("digits:test", model, n=9))
        assert torch.equal(x, demo.digits_split()[2][:9]) and torch.equal(y, demo.digits_split()[3][:9])
