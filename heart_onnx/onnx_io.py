"""Load and save ONNX files safely: one clear ``HeartError`` per way a file can be wrong.

    model = load_model("model.onnx")                   # weights (external data) loaded
    model = load_model("model.onnx", load_external=False)   # structure only (inspect, FLOPs)
    save_model(model, "out.onnx")                      # atomic; external data when > 2 GB

``load_model`` reads the bytes itself and parses them with protobuf, so garbage never reaches the C++
checker unparsed; every decode failure (``DecodeError``, ``RecursionError`` from deep nesting,
``MemoryError``, ...) becomes a ``HeartError``. Before ``onnx.checker`` runs, initializers are checked
for impossible sizes (negative or huge dims, data shorter than the dims say), so nothing allocates
memory from a corrupt header. External data must sit beside the model (no absolute paths, no
``..``) and be long enough for every tensor that points into it. The input file is only read.

Big models stay cheap: the checker runs on a light copy (weights stubbed, :func:`check_light`) above
64 MiB of weights, and single-file saves stream one tensor at a time (:func:`write_streamed`).

``save_model`` never modifies the ``ModelProto`` it is given (it saves a copy when external data is
written), writes the ``.onnx`` and its ``<name>.data`` in a temporary directory beside the target and
moves them into place by renames (data first), and refuses to overwrite the file it was loaded from.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import HeartError

TWO_GB = 2**31  # protobuf's hard limit for one serialized message
EXTERNAL_THRESHOLD = 1024  # bytes: tensors at least this big go to the .data file
MAX_ELEMENTS = 2**40  # no real initializer is bigger; anything above is a corrupt header

# TensorProto.DataType -> bytes per element (0 for strings / unknown)
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 8: 0, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
             17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1, 23: 1}


def _onnx() -> Any:
    import onnx

    return onnx


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _parse(data: bytes, path: Path) -> Any:
    """Parse ``data`` as a ModelProto or raise a HeartError saying whether it is truncated or not ONNX."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    looks_onnx = data[:1] == b"\x08"  # every writer puts ir_version (field 1, varint) first
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        msg = str(exc)
        if looks_onnx and ("runcat" in msg or "parsing" in msg.lower()):
            raise HeartError(f"{path} is truncated or corrupt (protobuf: {_first_line(exc)}): export or copy it again") from None
        raise HeartError(f"{path} is not an ONNX model (cannot decode it as protobuf: {_first_line(exc)})") from None
    except RecursionError:
        raise HeartError(f"{path} is not a usable ONNX model (nesting too deep to decode)") from None
    except MemoryError:
        raise HeartError(f"{path} is not a usable ONNX model (decoding it would need more memory than is available)") from None
    except Exception as exc:  # noqa: BLE001 - upb may raise other errors on garbage
        raise HeartError(f"{path} is not an ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    return model


def _check_header(model: Any, path: Path) -> None:
    onnx = _onnx()
    if not model.HasField("graph"):
        hint = "" if model.ir_version else " (no ir_version either: is this an ONNX file?)"
        raise HeartError(f"{path} is not a valid ONNX model: it has no graph{hint}")
    if model.ir_version <= 0:
        raise HeartError(f"{path} is not a valid ONNX model: ir_version is {model.ir_version}")
    if model.ir_version > onnx.IR_VERSION:
        raise HeartError(f"{path} has ONNX IR version {model.ir_version}, newer than this onnx supports "
                         f"({onnx.IR_VERSION}): upgrade onnx (pip install -U onnx)")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default and len(model.graph.node):
        raise HeartError(f"{path} is not a valid ONNX model: it imports no default-domain opset")
    newest = onnx.defs.onnx_opset_version()
    for v in default:
        if v < 1 or v > newest:
            raise HeartError(f"{path} uses opset {v}, which this onnx does not know (1..{newest}): "
                             "re-export with a supported opset or upgrade onnx")


def _check_text(model: Any, path: Path) -> None:
    """Names must be text: protobuf hands back ``bytes`` for invalid UTF-8 in proto2 string fields."""
    def bad(*values: Any) -> bool:
        return any(not isinstance(v, str) for v in values)

    g = model.graph
    items = [(p.key, p.value) for p in model.metadata_props] + [(model.producer_name, model.producer_version, g.name)]
    items += [(n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute)) for n in g.node]
    items += [(t.name,) for t in g.initializer] + [(v.name,) for v in (*g.input, *g.output, *g.value_info)]
    items += [(o.domain,) for o in model.opset_import]
    for values in items:
        if bad(*values):
            raise HeartError(f"{path} is corrupt: it has names that are not valid UTF-8 text (damaged file?): "
                             "export or copy it again")


def _tensors(graph: Any, depth: int = 0) -> Any:
    """Every TensorProto in ``graph`` and its subgraphs (initializers and Constant attributes)."""
    if depth > 64:
        raise RecursionError
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g, depth + 1)
            for g in a.graphs:
                yield from _tensors(g, depth + 1)


def _is_external(t: Any) -> bool:
    return t.data_location == 1  # TensorProto.EXTERNAL


def _check_tensors(model: Any, path: Path, check_external_files: bool) -> list[Any]:
    """Check dims against data sizes; return the external tensors. Nothing is allocated."""
    base = path.parent
    external = []
    sizes: dict[str, int] = {}
    try:
        tensors = list(_tensors(model.graph))
    except RecursionError:
        raise HeartError(f"{path} is not a usable ONNX model (subgraphs nested too deep)") from None
    for t in tensors:
        n = 1
        for d in t.dims:
            if d < 0:
                raise HeartError(f"{path} is corrupt: initializer {t.name!r} has a negative dimension {list(t.dims)}")
            n *= d
            if n > MAX_ELEMENTS:
                raise HeartError(f"{path} is corrupt: initializer {t.name!r} claims {list(t.dims)} elements")
        item = _ITEMSIZE.get(t.data_type, 0)
        if _is_external(t):
            external.append(t)
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
                raise HeartError(f"{path}: initializer {t.name!r} points to external data {loc!r} outside the model's "
                                 "folder: re-save the model with its data beside it")
            if not check_external_files:
                continue
            try:
                offset = int(info.get("offset", 0) or 0)
                length = int(info["length"]) if info.get("length") else n * item
            except ValueError:
                raise HeartError(f"{path}: initializer {t.name!r} has a corrupt external-data offset/length") from None
            if loc not in sizes:
                f = base / loc
                if not f.is_file():
                    raise HeartError(f"{path} needs its external data file {f.name} beside it, and it is missing: "
                                     "copy the .data file next to the .onnx (or re-export)")
                sizes[loc] = f.stat().st_size
            if offset < 0 or offset + length > sizes[loc] or (item and length < n * item):
                raise HeartError(f"{path}: external data file {loc} is too short for initializer {t.name!r} "
                                 "(truncated copy?): copy it again or re-export")
            continue
        if t.HasField("raw_data") or len(t.raw_data):
            if item and len(t.raw_data) != n * item:
                raise HeartError(f"{path} is truncated or corrupt: initializer {t.name!r} has {len(t.raw_data)} bytes "
                                 f"of data for dims {list(t.dims)}")
        else:
            have = (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data)
                    + len(t.uint64_data) + len(t.string_data))
            if have and have not in (n, 2 * n):  # complex types store 2 values per element
                raise HeartError(f"{path} is corrupt: initializer {t.name!r} has {have} values for dims {list(t.dims)}")
    return external


def load_model(path: str | os.PathLike, load_external: bool = True, check: bool = True) -> Any:
    """Load an ONNX file and return its ``onnx.ModelProto``.

    - ``load_external``: default True, read external weight data into the model; False leaves
      external tensors as references (their files are still checked to exist and be long enough).
    - ``check``: default True, run ``onnx.checker`` (after the size checks above).
    Raises ``HeartError`` for a missing file, a directory, an empty/non-ONNX/truncated file, a model
    that parses but is invalid (no graph, unknown opset, checker failure), or missing external data.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise HeartError(f"{p} does not exist: give the path of an .onnx file")
    if p.is_dir():
        raise HeartError(f"{p} is a directory: give the path of an .onnx file inside it")
    try:
        size = p.stat().st_size
        if size == 0:
            raise HeartError(f"{p} is empty (0 bytes): export the model again")
        if size >= TWO_GB:
            raise HeartError(f"{p} is {size / 2**30:.1f} GiB in one file, over protobuf's 2 GiB limit: "
                             "save it with external data (weights in a .data file beside it)")
        data = p.read_bytes()
    except OSError as exc:
        raise HeartError(f"cannot read {p}: {exc.strerror or exc}") from None
    model = _parse(data, p)
    del data
    _check_header(model, p)
    _check_text(model, p)
    external = _check_tensors(model, p, check_external_files=True)
    if external and load_external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, MemoryError) as exc:
            raise HeartError(f"cannot read the external data of {p}: {_first_line(exc)}") from None
    if check:
        _run_checker(model, p, external and not load_external)
    return model


LIGHT_CHECK_BYTES = 2**26  # weights above this: the checker runs on a light copy (light_model)
STUB_FILE = "heart-stub.bin"


def light_model(model: Any, keep_elements: int = 64, stub: bool = False) -> Any:
    """A copy of ``model`` whose initializers over ``keep_elements`` elements keep name, type and dims only.

    ``stub`` (default False): mark them as external data in ``heart-stub.bin`` so that the ONNX
    checker accepts them (see :func:`check_light`). Shape inference needs no weight data.
    """
    onnx = _onnx()
    light = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, f, getattr(model, f))
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    g, lg = model.graph, light.graph
    lg.name = g.name
    for f in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        getattr(lg, f).extend(getattr(g, f))
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= keep_elements and not _is_external(t):
            lg.initializer.append(t)
            continue
        s = lg.initializer.add()
        s.name, s.data_type = t.name, t.data_type
        s.dims.extend(t.dims)
        if stub:
            s.data_location = onnx.TensorProto.EXTERNAL
            s.external_data.add(key="location", value=STUB_FILE)
    return light


def check_light(model: Any, full_check: bool = False) -> None:
    """``onnx.checker`` on a light copy of ``model`` (weights stubbed): cheap for big models, any size.

    The checker needs a path for external data, so the copy is written to a temporary folder next to
    an empty stub file. Weight data itself is not checked here (``load_model`` checks sizes first).
    ``full_check`` (default False): also strict shape inference. Raises ``onnx.checker.ValidationError``
    (or ``onnx.shape_inference.InferenceError`` from the full check).
    """
    onnx = _onnx()
    light = light_model(model, keep_elements=1024, stub=True)
    with tempfile.TemporaryDirectory(prefix="heart_check_") as d:
        (Path(d) / STUB_FILE).write_bytes(b"")
        p = Path(d) / "light.onnx"
        p.write_bytes(light.SerializeToString())
        onnx.checker.check_model(str(p), full_check=full_check)


def _declared_bytes(model: Any) -> int:
    """Weight bytes from the initializers' dims (no data access: upb's ByteSize serializes the model)."""
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * (_ITEMSIZE.get(t.data_type, 0) or 1)
    return total


def _run_checker(model: Any, path: Path, has_unloaded_external: bool) -> None:
    onnx = _onnx()
    try:
        if has_unloaded_external:
            onnx.checker.check_model(str(path))  # reads external data lazily, beside the file
        elif _declared_bytes(model) >= LIGHT_CHECK_BYTES:
            check_light(model)
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise HeartError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from None
    except (RecursionError, MemoryError, ValueError, OSError) as exc:
        raise HeartError(f"{path} is not a usable ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _split(msg: Any, field_number: int) -> tuple[bytes, bytes]:
    """``msg`` serialized without one field: (fields numbered below it, fields above it)."""
    lo, hi = type(msg)(), type(msg)()
    for fd, value in msg.ListFields():
        if fd.number == field_number:
            continue
        dst = lo if fd.number < field_number else hi
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)
    return lo.SerializeToString(), hi.SerializeToString()


_GRAPH_FIELD, _INITIALIZER_FIELD = 7, 5  # ModelProto.graph, GraphProto.initializer


def write_streamed(model: Any, f: Any) -> int:
    """Write ``model``'s protobuf encoding to binary file ``f`` one initializer at a time; returns bytes written.

    The bytes equal ``model.SerializeToString()`` (fields in number order), but the peak memory is one
    tensor instead of the whole model twice (upb serializes into a buffer, then copies it into a
    ``bytes``). Raises ValueError over protobuf's 2 GiB limit.
    """
    g = model.graph
    g_lo, g_hi = _split(g, _INITIALIZER_FIELD)
    tag = _varint(_INITIALIZER_FIELD << 3 | 2)
    sizes = [t.ByteSize() for t in g.initializer]
    g_len = len(g_lo) + len(g_hi) + sum(len(tag) + len(_varint(n)) + n for n in sizes)
    m_lo, m_hi = _split(model, _GRAPH_FIELD)
    total = len(m_lo) + len(m_hi) + len(_varint(_GRAPH_FIELD << 3 | 2)) + len(_varint(g_len)) + g_len
    if total >= TWO_GB:
        raise ValueError(f"the model serializes to {total} bytes, over protobuf's 2 GiB limit")
    f.write(m_lo)
    if model.HasField("graph"):
        f.write(_varint(_GRAPH_FIELD << 3 | 2) + _varint(g_len) + g_lo)
        for t, n in zip(g.initializer, sizes):
            blob = t.SerializeToString()
            if len(blob) != n:
                raise ValueError(f"initializer {t.name!r} changed size while it was written")
            f.write(tag + _varint(n))
            f.write(blob)
        f.write(g_hi)
    else:
        total -= len(_varint(_GRAPH_FIELD << 3 | 2)) + len(_varint(g_len)) + g_len
    f.write(m_hi)
    return total


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    return a.resolve() == b.resolve()


def save_model(model: Any, path: str | os.PathLike, *, external_data: bool | None = None,
               source: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    - ``external_data``: default None = automatic (True when the weights are over 2 GB): tensors of
      at least 1 KiB go to one file ``<name>.data`` beside the ``.onnx``.
    - ``source``: default None; the file the model was loaded from: saving onto it is refused
      (as is saving onto any external data file the model still refers to).
    The model object is not modified. Raises ``HeartError`` on a bad target.
    """
    onnx = _onnx()
    target = Path(os.fspath(path))
    if target.is_dir():
        raise HeartError(f"output {target} is a directory: give a file name ending in .onnx")
    if source is not None and _same_file(target, Path(os.fspath(source))):
        raise HeartError(f"output path {target} is the same as the input: choose another output (-o)")
    if any(_is_external(t) for t in model.graph.initializer):
        raise HeartError("this model still refers to external data that was not loaded: "
                         "load it with load_model(path, load_external=True) before saving")
    if external_data is None:
        external_data = _declared_bytes(model) >= TWO_GB - 2**26
    target.parent.mkdir(parents=True, exist_ok=True)
    data_name = target.name + ".data"
    if source is not None and _same_file(target.parent / data_name, Path(os.fspath(source)).parent / data_name) \
            and external_data and (Path(os.fspath(source)).parent / data_name).exists():
        raise HeartError(f"output {target} would overwrite the input's external data {data_name}: choose another name")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        built = tmpdir / target.name
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # onnx.save with external data rewrites the tensors it is given
            onnx.save_model(copy, str(built), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=EXTERNAL_THRESHOLD, convert_attribute=False)
            del copy
            if (tmpdir / data_name).exists():
                os.replace(tmpdir / data_name, target.parent / data_name)
        else:
            try:
                with open(built, "wb") as f:
                    write_streamed(model, f)
            except ValueError as exc:
                raise HeartError(f"model is too large for one file ({_first_line(exc)}): save with external_data=True") from None
        os.replace(built, target)
    except OSError as exc:
        raise HeartError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target
