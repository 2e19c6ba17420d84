"""Calibration and evaluation data from one spec string, as a ``torch.utils.data.DataLoader``.

Spec strings (``--data`` on the command line)
---------------------------------------------
- ``digits`` / ``digits:calib`` / ``digits:val`` / ``digits:train`` / ``digits:test``: scikit-learn's digits
  with the fixed demo split (``heart_onnx.models.demo.DEMO_SPLIT``: train 1047, val 300, test 450; the demo
  models never trained on val or test). ``calib`` (the default) is the same 300 images as ``val``. Images are resized (bilinear) and repeated to the model's input
  (C, H, W) if that is not (1, 8, 8), then normalised (see *Normalisation*).
- ``folder:PATH``: an image folder. Class sub-folders (``PATH/<class>/*.png``) give labelled data: the
  label is the folder name when every class folder is named by an integer (``0``, ``1``, ... ``10``), else
  the index of the name in sorted order (``loader.dataset.classes`` lists them). Images directly in
  ``PATH`` (no sub-folders) give unlabelled data. Read with PIL, converted to ``L`` (1 channel) or ``RGB``
  (3 channels), resized (bilinear) to the model's (H, W), scaled to 0..1, normalised.
- ``npz:PATH``: arrays ``x`` and optional ``y`` (loaded with ``allow_pickle=False``). For image models ``x``
  is (N, C, H, W) (or (N, H, W) for 1 channel) *already normalised*, used as is (cast to float32); for
  token models ``x`` is (N, T) integer token ids (optional array ``attention_mask``, same shape). ``y``: (N,)
  integer class labels.
- ``text:PATH``: a UTF-8 text file, tokenized and cut into non-overlapping windows of ``seq_len`` tokens
  (the tail shorter than a window is dropped). With ``tokenizer=DIR`` (a local Hugging Face folder, loaded
  with ``local_files_only=True``) that tokenizer is used; otherwise the *byte-level fallback*: the UTF-8
  bytes of the text, byte ``b`` becoming token id ``b % vocab_size`` (identity when the vocabulary has at
  least 256 entries). The fallback gives realistically shaped inputs for speed and plumbing, not language a
  pretrained model was trained on: pass the model's tokenizer for meaningful calibration.
- ``random``: seeded random inputs (standard normal images, uniform token ids): for speed only.
- a bare path is accepted too: a folder -> ``folder:``, ``*.npz`` -> ``npz:``, any other file -> ``text:``.

Batch convention (one for every source)
---------------------------------------
Every batch is a tuple ``(inputs, labels)``:

- ``inputs``: what ``ModelAdapter.forward(inputs)`` accepts: a float32 tensor (B, C, H, W) for image
  models; a dict ``{"input_ids": (B, T) int64, "attention_mask": (B, T) int64}`` for token models;
- ``labels``: an int64 tensor (B,) of class ids when the source has labels, else ``None`` (text and
  random data never have labels; for language models the next-token targets are ``input_ids[:, 1:]``).

``split_batch(batch)`` returns ``(inputs, labels)`` from this form and also from a bare tensor, a
``(x,)``/``(x, y)`` sequence or a dict (a ``"labels"`` key is popped), so consumers can accept
user-made iterables too.

Normalisation (images)
----------------------
``mean``/``std`` (per channel, on the 0..1 scale) default to, in order: the timm model's
``pretrained_cfg`` mean/std when it has one; the digits normalisation 0.5/0.5 for 1-channel inputs;
ImageNet's (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225) for 3-channel inputs.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._deps import require
from .errors import HeartError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
DIGITS_SPLITS = ("calib", "val", "train", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SEQ_LEN = 128
DEFAULT_RANDOM_N = 64
SOURCES = ("digits", "folder", "npz", "text", "random")

DATA_HELP = (
    "data spec: digits[:calib|train|test] (embedded), folder:DIR (class sub-folders or plain images), "
    "npz:FILE (arrays x, optional y), text:FILE (windows of seq-len tokens), random (speed only)"
)


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: ``kind="image"`` with ``shape=(C, H, W)`` or ``kind="tokens"`` with ``shape=(T,)``."""

    kind: Literal["image", "tokens"]
    shape: tuple[int, ...]
    vocab_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


# ------------------------------------------------------------------------------------ batch helpers
def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` from a batch in the module's convention or a tensor / ``(x,)`` / ``(x, y)`` / dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        d = dict(batch)
        labels = d.pop("labels", None)
        return d, labels
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
    raise HeartError(f"cannot read a batch of type {type(batch).__name__}: yield tensors, (x, y) pairs or dicts of tensors")


def collate(items: Sequence[tuple[Any, Any]]) -> tuple[Any, torch.Tensor | None]:
    """Stack ``(inputs, label)`` samples into one ``(inputs, labels)`` batch (labels None if any is None)."""
    xs = [it[0] for it in items]
    ys = [it[1] for it in items]
    if isinstance(xs[0], dict):
        inputs: Any = {k: torch.stack([x[k] for x in xs]) for k in xs[0]}
    else:
        inputs = torch.stack(xs)
    labels = None if any(y is None for y in ys) else torch.as_tensor(ys, dtype=torch.int64)
    return inputs, labels


def concat_batches(batches: Iterable[Any]) -> tuple[Any, torch.Tensor | None]:
    """Concatenate all batches of a loader into one ``(inputs, labels)`` (labels None if any batch lacks them)."""
    ins, labs = [], []
    for b in batches:
        x, y = split_batch(b)
        ins.append(x)
        labs.append(y)
    if not ins:
        raise HeartError("the data source yielded no batches: check the data spec and n")
    if isinstance(ins[0], dict):
        inputs: Any = {k: torch.cat([x[k] for x in ins]) for k in ins[0]}
    else:
        inputs = torch.cat(ins)
    labels = None if any(y is None for y in labs) else torch.cat(labs)
    return inputs, labels


# --------------------------------------------------------------------------------------- datasets
class TensorPairs(Dataset):
    """In-memory samples: ``inputs`` a tensor (N, ...) or dict of (N, ...) tensors, ``labels`` (N,) or None."""

    def __init__(self, inputs: Any, labels: torch.Tensor | None = None, classes: Sequence[str] | None = None):
        self.inputs = inputs
        self.labels = labels
        self.classes = list(classes) if classes is not None else None
        self._n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x = {k: v[i] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[i]
        return x, (None if self.labels is None else int(self.labels[i]))


class ImageFiles(Dataset):
    """Images read lazily with PIL, resized to (H, W), scaled to 0..1 and normalised per channel."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None, spec: InputSpec, classes: Sequence[str] | None = None):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else None
        self.spec = spec
        self.classes = list(classes) if classes is not None else None
        c = spec.shape[0]
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(c, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(c, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        image_mod = require("PIL.Image", "reading image folders")
        c, h, w = self.spec.shape
        path = self.files[i]
        try:
            with image_mod.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), image_mod.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
        except (OSError, ValueError) as exc:
            raise HeartError(f"cannot read image {path} ({exc}): remove it or convert it to PNG/JPEG") from None
        x = torch.from_numpy(arr.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
        x = (x - self._mean) / self._std
        return x, (None if self.labels is None else self.labels[i])


# ------------------------------------------------------------------------------------ input spec
def _timm_norm(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return None


def _vocab_of(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if v else None


def _as_adapter(model: Any) -> Any:
    if hasattr(model, "example_inputs") and hasattr(model, "model"):
        return model
    try:
        from .models.registry import adapt
    except ImportError:
        return None
    try:
        return adapt(model)
    except HeartError:
        return None


def input_spec(model: Any = None, *, input_shape: Sequence[int] | None = None, vocab_size: int | None = None,
               seq_len: int | None = None, mean: Sequence[float] | float | None = None,
               std: Sequence[float] | float | None = None) -> InputSpec:
    """What ``model`` (a ``ModelAdapter`` or module; default None) takes, overridden by the explicit options.

    The shape comes from ``input_shape``, else the module's ``heart_onnx_input_shape`` attribute (the demo
    models set it: a conv net has no fixed input size), else ``adapter.example_inputs(1)``.

    ``input_shape`` (default None): (C, H, W) for images or (T,) for tokens, without the batch dimension.
    ``vocab_size`` (default None: ``model.config.vocab_size``) and ``seq_len`` (default None: 128, or the
    model's ``max_position_embeddings`` if smaller) for token models; ``mean``/``std``
    (default None: see the module docstring) for images.
    """
    adapter = _as_adapter(model) if model is not None else None
    module = getattr(adapter, "model", model)
    kind: str | None = None
    shape: tuple[int, ...] | None = None
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 3:
            kind = "image"
        elif len(shape) == 1:
            kind = "tokens"
        else:
            raise HeartError(f"input shape {shape} is neither (C, H, W) nor (T,): give it without the batch dimension")
    elif getattr(module, "heart_onnx_input_shape", None) is not None:  # models that declare their input (demo models)
        shape = tuple(int(s) for s in module.heart_onnx_input_shape)
        kind = "image" if len(shape) == 3 else "tokens"
    elif adapter is not None:
        try:
            ex = adapter.example_inputs(1)
        except NotImplementedError:
            ex = None
        if isinstance(ex, dict) and "input_ids" in ex:
            kind, shape = "tokens", (int(ex["input_ids"].shape[-1]),)
        elif isinstance(ex, torch.Tensor) and ex.is_floating_point() and ex.ndim == 4:
            kind, shape = "image", tuple(int(s) for s in ex.shape[1:])
    if kind is None:
        raise HeartError("cannot tell the model's input shape: pass input_shape=(C, H, W) or (T,) (or --input-shape)")
    if kind == "tokens":
        if seq_len is not None:
            shape = (int(seq_len),)
        elif input_shape is None:  # language models take any length: 128, or less if positions run out
            max_pos = getattr(getattr(module, "config", None), "max_position_embeddings", None)
            shape = (min(DEFAULT_SEQ_LEN, int(max_pos)) if max_pos else DEFAULT_SEQ_LEN,)
        vocab = vocab_size or _vocab_of(module)
        if vocab is None:
            raise HeartError("token data needs the vocabulary size: pass vocab_size=... or a model with config.vocab_size")
        return InputSpec("tokens", shape, vocab_size=int(vocab))
    c = shape[0]
    if mean is None or std is None:
        norm = _timm_norm(module) if module is not None else None
        if norm is not None and len(norm[0]) == c:
            dm, ds = norm
        elif c == 1:
            dm, ds = (0.5,), (0.5,)
        elif c == 3:
            dm, ds = IMAGENET_MEAN, IMAGENET_STD
        else:
            dm, ds = (0.5,) * c, (0.5,) * c
        mean = dm if mean is None else mean
        std = ds if std is None else std
    mean_t = _per_channel(mean, c, "mean")
    std_t = _per_channel(std, c, "std")
    if any(s <= 0 for s in std_t):
        raise HeartError(f"std must be positive, got {std_t}")
    return InputSpec("image", shape, mean=mean_t, std=std_t)


def _per_channel(v: Sequence[float] | float, c: int, what: str) -> tuple[float, ...]:
    vals = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    if len(vals) == 1:
        vals = vals * c
    if len(vals) != c:
        raise HeartError(f"{what} has {len(vals)} values but the model takes {c} channels: give 1 or {c} values")
    return vals


# --------------------------------------------------------------------------------------- parsing
def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"npz:/a/b.npz"`` -> ``("npz", "/a/b.npz")``; ``"digits:test"`` -> ``("digits", "test")``; bare paths by kind."""
    if not isinstance(spec, str) or not spec.strip():
        raise HeartError(f"empty data spec: use one of {', '.join(SOURCES)} ({DATA_HELP})")
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    if head in SOURCES:
        if head == "random" and sep and rest:
            raise HeartError(f"'random' takes no argument (got {spec!r}): use n= and batch_size= instead")
        if head in ("folder", "npz", "text") and not rest:
            raise HeartError(f"data spec {spec!r} needs a path: {head}:PATH")
        return head, (rest or None)
    p = Path(spec).expanduser()
    if p.is_dir():
        return "folder", spec
    if p.is_file():
        return ("npz" if p.suffix.lower() == ".npz" else "text"), spec
    raise HeartError(f"unknown data spec {spec!r}: {DATA_HELP}")


def _existing(path: str, want_dir: bool) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise HeartError(f"data path {p} does not exist: check the path")
    if want_dir and not p.is_dir():
        raise HeartError(f"{p} is not a folder: folder:PATH needs a directory of images or class sub-folders")
    if not want_dir and not p.is_file():
        raise HeartError(f"{p} is a folder, not a file: use folder:{p} for image folders")
    return p


def _subset(total: int, n: int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded random subset of ``n`` kept in ascending order (mixes classes)."""
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


# --------------------------------------------------------------------------------------- sources
def _digits(spec: InputSpec, split: str, n: int | None) -> Dataset:
    if spec.kind != "image":
        raise HeartError("digits is image data but the model takes tokens: use text:PATH, npz:PATH or random")
    from .models import demo

    if split in ("calib", "val"):
        x, y = demo.digits_val(normalise=False)
    else:
        x_tr, y_tr, x_te, y_te = demo.digits_split(normalise=False)
        x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    if n is not None:
        x, y = x[:n], y[:n]
    x01 = x / 16.0  # (N, 1, 8, 8) on 0..1
    c, h, w = spec.shape
    if (h, w) != (8, 8):
        x01 = torch.nn.functional.interpolate(x01, size=(h, w), mode="bilinear", align_corners=False)
    x01 = x01.expand(-1, c, -1, -1) if c != 1 else x01  # (N, C, H, W)
    mean = torch.tensor(spec.mean).view(1, c, 1, 1)
    std = torch.tensor(spec.std).view(1, c, 1, 1)
    xn = ((x01 - mean) / std).float().contiguous()
    return TensorPairs(xn, y.clone(), classes=[str(i) for i in range(10)])


def _folder(spec: InputSpec, path: str, n: int | None, seed: int) -> Dataset:
    if spec.kind != "image":
        raise HeartError("folder:PATH holds images but the model takes tokens: use text:PATH or npz:PATH")
    root = _existing(path, want_dir=True)

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in subdirs if images_in(d)]
    top = images_in(root)
    if class_dirs and top:
        raise HeartError(f"{root} has both images and class sub-folders: put every image in a class folder, or use a flat folder")
    if class_dirs:
        names = [d.name for d in class_dirs]
        numeric = all(s.isdigit() for s in names)
        files, labels = [], []
        for i, d in enumerate(class_dirs):
            imgs = images_in(d)
            files += imgs
            labels += [int(d.name) if numeric else i] * len(imgs)
        classes = names
    elif top:
        files, labels, classes = top, None, None
    else:
        raise HeartError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root} or its sub-folders: check the path")
    keep = _subset(len(files), n, seed)
    files = [files[i] for i in keep]
    labels = [labels[i] for i in keep] if labels is not None else None
    return ImageFiles(files, labels, spec, classes)


def _npz(spec: InputSpec, path: str, n: int | None, seed: int) -> Dataset:
    p = _existing(path, want_dir=False)
    with open(p, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise HeartError(f"{p} is not a valid .npz file (not a zip archive): write it with np.savez(path, x=..., y=...)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:
        raise HeartError(f"cannot read {p} without pickle ({exc}): save plain numeric arrays with np.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise HeartError(f"{p} is not a valid .npz file ({exc}): write it with np.savez(path, x=..., y=...)") from None
    if not isinstance(arrays, dict) or "x" not in arrays:
        raise HeartError(f"{p} has no array 'x' (found {sorted(arrays)}): save inputs as np.savez(path, x=..., y=...)")
    x = arrays["x"]
    total = len(x) if x.ndim else 0
    if total == 0:
        raise HeartError(f"{p}: array 'x' is empty")
    y = arrays.get("y")
    if y is not None:
        if y.shape != (total,) or not np.issubdtype(y.dtype, np.integer):
            raise HeartError(f"{p}: 'y' must be ({total},) integer class labels, got {y.shape} {y.dtype}")
    keep = _subset(total, n, seed)
    labels = torch.from_numpy(y[keep].astype(np.int64)) if y is not None else None
    if spec.kind == "image":
        c, h, w = spec.shape
        if x.ndim == 3 and c == 1:
            x = x[:, None]
        if x.shape[1:] != (c, h, w):
            raise HeartError(f"{p}: 'x' has shape {x.shape} but the model takes (N, {c}, {h}, {w}): resize/transpose it (channels first)")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise HeartError(f"{p}: 'x' must be numeric, got {x.dtype}")
        xt = torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))
        return TensorPairs(xt, labels)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise HeartError(f"{p}: token data 'x' must be (N, T) integer ids, got {x.shape} {x.dtype}")
    if x.min() < 0 or x.max() >= spec.vocab_size:
        raise HeartError(f"{p}: token ids must lie in [0, {spec.vocab_size}) for this model, got [{x.min()}, {x.max()}]")
    ids = torch.from_numpy(x[keep].astype(np.int64))
    mask = arrays.get("attention_mask")
    if mask is not None:
        if mask.shape != x.shape:
            raise HeartError(f"{p}: 'attention_mask' shape {mask.shape} differs from 'x' {x.shape}")
        mask_t = torch.from_numpy(mask[keep].astype(np.int64))
    else:
        mask_t = torch.ones_like(ids)
    return TensorPairs({"input_ids": ids, "attention_mask": mask_t}, labels)


def byte_tokens(text: str, vocab_size: int) -> np.ndarray:
    """The byte-level fallback tokenizer: UTF-8 bytes ``b`` -> ids ``b % vocab_size`` (int64)."""
    if vocab_size < 1:
        raise HeartError(f"vocab_size must be >= 1, got {vocab_size}")
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return b % vocab_size


def _text(spec: InputSpec, path: str, n: int | None, tokenizer: Any) -> Dataset:
    if spec.kind != "tokens":
        raise HeartError("text:PATH gives token windows but the model takes images: use digits, folder:PATH or npz:PATH")
    p = _existing(path, want_dir=False)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HeartError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it to UTF-8") from None
    seq = spec.shape[0]
    vocab = int(spec.vocab_size)
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
        ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if ids.size and int(ids.max()) >= vocab:
            raise HeartError(f"tokenizer produced id {int(ids.max())} but the model's vocabulary has {vocab}: use the model's own tokenizer")
    else:
        ids = byte_tokens(text, vocab)
    windows = len(ids) // seq
    if windows == 0:
        raise HeartError(f"{p} has {len(ids)} tokens, fewer than one window of {seq}: use a longer text or a smaller seq_len")
    if n is not None:
        windows = min(windows, n)
    x = torch.from_numpy(ids[: windows * seq].reshape(windows, seq).copy())  # (N, T)
    return TensorPairs({"input_ids": x, "attention_mask": torch.ones_like(x)}, None)


def _load_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer  # already a tokenizer object
    d = Path(tokenizer).expanduser()
    if not d.is_dir():
        raise HeartError(f"tokenizer folder {d} does not exist: give a local Hugging Face folder (save_pretrained)")
    transformers = require("transformers", "tokenizing text")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise HeartError(f"cannot load a tokenizer from {d} ({str(exc).splitlines()[0]}): it needs tokenizer.json or the vocab files") from None
    tok.model_max_length = int(1e30)  # windows are cut here; silence the 'sequence too long' warning
    return tok


def _random(spec: InputSpec, n: int | None, seed: int) -> Dataset:
    n = DEFAULT_RANDOM_N if n is None else n
    gen = torch.Generator().manual_seed(seed)
    if spec.kind == "image":
        return TensorPairs(torch.randn((n, *spec.shape), generator=gen), None)  # (N, C, H, W)
    ids = torch.randint(0, int(spec.vocab_size), (n, spec.shape[0]), generator=gen)  # (N, T)
    return TensorPairs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None)


# --------------------------------------------------------------------------------------------- API
def load_dataset(spec: str, model: Any = None, *, input_shape: Sequence[int] | None = None, n: int | None = None,
                 split: str | None = None, seq_len: int | None = None, vocab_size: int | None = None,
                 tokenizer: Any = None, mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None, seed: int = 0) -> Dataset:
    """The ``Dataset`` behind :func:`load_data` (same options); samples are ``(inputs, label_or_None)``."""
    if n is not None and n < 1:
        raise HeartError(f"n must be >= 1, got {n}")
    source, arg = parse_spec(spec)
    if source == "digits":
        if arg is not None and split is not None and arg != split:
            raise HeartError(f"data spec {spec!r} names split {arg!r} but split={split!r} was also given: use one")
        which = arg or split or "calib"
        if which not in DIGITS_SPLITS:
            raise HeartError(f"digits has splits {', '.join(DIGITS_SPLITS)}, not {which!r}: e.g. digits:test")
        if model is None and input_shape is None:
            from .models.demo import INPUT_SHAPE

            input_shape = INPUT_SHAPE
    elif split is not None and split not in DIGITS_SPLITS:
        raise HeartError(f"unknown split {split!r}: use one of {', '.join(DIGITS_SPLITS)}")
    if model is None and input_shape is None and (source == "text" or seq_len is not None or vocab_size is not None):
        input_shape = (seq_len or DEFAULT_SEQ_LEN,)  # token data without a model
        if vocab_size is None and source == "text":
            vocab_size = len(_load_tokenizer(tokenizer)) if tokenizer is not None else 256
    ispec = input_spec(model, input_shape=input_shape, vocab_size=vocab_size, seq_len=seq_len, mean=mean, std=std)
    if source == "digits":
        return _digits(ispec, which, n)
    if source == "folder":
        return _folder(ispec, arg, n, seed)
    if source == "npz":
        return _npz(ispec, arg, n, seed)
    if source == "text":
        return _text(ispec, arg, n, tokenizer)
    return _random(ispec, n, seed)


def load_data(spec: str, model: Any = None, *, input_shape: Sequence[int] | None = None, n: int | None = None,
              batch_size: int = 32, split: str | None = None, seq_len: int | None = None,
              vocab_size: int | None = None, tokenizer: Any = None, mean: Sequence[float] | float | None = None,
              std: Sequence[float] | float | None = None, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` of ``(inputs, labels)`` batches from a data ``spec`` (see the module docstring).

    ``model`` (default None): a ``ModelAdapter`` or module; its input shape, vocabulary and normalisation
    are used unless ``input_shape`` ((C, H, W) or (T,), default None), ``seq_len``, ``vocab_size``,
    ``mean``/``std`` (default None) say otherwise. ``n`` (default None = all; ``random``: 64) caps the
    samples (folder/npz: a seeded random subset; digits/text: the first ``n``). ``batch_size`` default 32.
    ``split`` (default None = ``calib``) for digits. ``tokenizer`` (default None = byte-level fallback):
    a local Hugging Face folder or tokenizer object. ``shuffle`` (default False), ``seed`` (default 0).
    """
    if batch_size < 1:
        raise HeartError(f"batch_size must be >= 1, got {batch_size}")
    ds = load_dataset(spec, model, input_shape=input_shape, n=n, split=split, seq_len=seq_len, vocab_size=vocab_size,
                      tokenizer=tokenizer, mean=mean, std=std, seed=seed)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=gen, num_workers=0)
