"""``prune(model, plan, out)``: apply a Plan to an ONNX model by graph surgery (no torch).

Steps: load (``heart_onnx.onnx_io``) -> check the plan belongs to this model (the export's
``heart_onnx.fingerprint`` metadata, the plan's weight anchors, the number of layers, heads, head
size, width and token count) -> find the attention blocks (``surgery.match``) -> weight merges
(``surgery.pairs.apply_merges``, done first so they find the weights the plan hashed) -> tokens
(``surgery.tokens``) -> heads (``surgery.heads``) -> ``cleanup().toposort()`` ->
``onnx.checker.check_model(full_check=True)`` + strict shape inference + TensorRT rules -> the plan
recorded in ``metadata_props["heart_onnx.plan"]`` -> written atomically (a temporary file beside the
target), never over the input -> an ONNX Runtime smoke run on random inputs of that file -> renamed
into place only when the smoke run passes.

Cost on big models (ViT-B/16, 330 MB): the weights stay in the loaded proto. onnx-graphsurgeon
works on lazily loaded constants (``match.const_value`` does not cache big ones); untouched big
weights are exported as same-shape external-data stubs, so the checker, shape inference and the
TensorRT rules run on a light copy (the checker through a path, with an empty stub file); the
pruned model is then assembled *in* the loaded proto (nodes replaced, sliced weights added, the
untouched weights kept where they are) instead of being copied, and the smoke run loads the written
file after the proto is freed; the write streams one tensor at a time (``onnx_io.write_streamed``).
Peak memory is about twice the model, reached at load (the file's bytes and the parsed proto);
ViT-B/16: 5-8 s, +662 MiB RSS = 2.0x its 330 MiB of weights (``benchmarks/surgery_speed.py``).
"""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..errors import HeartError, PlanMismatch, UnsupportedGraph
from ..plan import Plan
from . import metadata


def _load(model: Any) -> tuple[Any, Path | None]:
    if isinstance(model, (str, os.PathLike)):
        from ..onnx_io import load_model

        return load_model(model), Path(os.fspath(model))
    onnx = require("onnx", "ONNX surgery")
    if isinstance(model, onnx.ModelProto):
        return model, None
    raise HeartError(f"prune expects an .onnx path or an onnx.ModelProto, got {type(model).__name__}")


def _check_identity(model: Any, plan: Plan) -> None:
    props = metadata.get_props(model)
    fp = props.get("heart_onnx.fingerprint")
    if fp is not None and fp != plan.fingerprint:
        raise PlanMismatch(f"this plan was made for another model (fingerprint {plan.fingerprint[:12]}, the ONNX file "
                           f"was exported from {fp[:12]}): re-run 'heart-onnx analyze' and 'heart-onnx plan' on this model")
    if props.get(metadata.PRUNED_KEY) == "1":
        raise HeartError("this ONNX file is already pruned: prune the dense export instead")


def _check_anchors(graph: Any, plan: Plan) -> None:
    from .match import find_initializer_by_sha

    # "<name>:rowsign" anchors locate Convs whose BatchNorm the exporter folded (their sha changed):
    # such a weight is checked by its row signature when its merge is applied
    missing = [name for name, sha in plan.anchors.items()
               if ":" not in name and f"{name}:rowsign" not in plan.anchors and find_initializer_by_sha(graph, sha) is None]
    if missing:
        raise PlanMismatch(f"this plan was made for another model: {len(missing)} of its {len(plan.anchors)} anchor "
                           f"weights (e.g. {missing[0]}) are not in this graph; re-run 'heart-onnx plan' on this model")


def _geometry(plan: Plan, blocks: list) -> tuple[int, int, int, int | None]:
    g = plan.geometry
    L = int(g.get("layers", len(blocks)))
    if len(blocks) != L:
        raise PlanMismatch(f"the plan is for a model with {L} layers, this graph has {len(blocks)} attention blocks: "
                           "use the ONNX export of the model the plan was made for")
    H = int(g.get("heads") or blocks[0].heads)
    Dh = int(g.get("head_dim") or blocks[0].head_dim)
    D = int(g.get("hidden") or blocks[0].hidden)
    for b in blocks:
        if (b.heads, b.head_dim) != (H, Dh):
            raise PlanMismatch(f"layer {b.layer} of the graph has {b.heads} heads of {b.head_dim}, the plan expects "
                               f"{H} of {Dh}: use the export of the model the plan was made for")
    seq = blocks[0].seq_len or g.get("seq_len")
    return H, Dh, D, (int(seq) if seq else None)


STUB_ELEMENTS = 1024  # untouched constants above this size are exported as stubs and kept in place


def _surgery(model: Any, plan: Plan, int32_indices: bool) -> Any:
    """Every pass of the plan on a gs.Graph of ``model`` (lazy constants); returns the graph."""
    from .carriers import clear_shapes
    from .heads import remove_heads
    from .match import find_attention_blocks, import_graph
    from .tokens import insert_token_stages

    _check_identity(model, plan)
    graph = import_graph(model)
    _check_anchors(graph, plan)
    blocks = find_attention_blocks(graph)
    if not blocks:
        if plan.heads or plan.tokens:
            raise UnsupportedGraph("this graph has no attention blocks, but the plan prunes heads or tokens: "
                                   "use the ONNX export of the transformer the plan was made for")
        H = Dh = D = 0
        seq = None
    else:
        H, Dh, D, seq = _geometry(plan, blocks)
    block_out = [b.block_output for b in blocks]
    soft = [None if len(plan.removed_heads(i)) >= H else b.softmax for i, b in enumerate(blocks)]
    if plan.merges:
        from .pairs import apply_merges

        apply_merges(graph, plan.merges, anchors=plan.anchors)
    if plan.tokens:
        if plan.family == "gpt_neox":
            raise HeartError("token pruning is for encoders (ViT, BERT): remove the token stages from this GPT-NeoX plan")
        if seq is None:
            raise UnsupportedGraph("the graph's sequence length is not static: export with heart-onnx export (dynamo), or "
                                   "fold it with 'polygraphy surgeon sanitize --fold-constants'")
        insert_token_stages(graph, plan, block_out, soft, seq_len=seq, hidden=D, int32_indices=int32_indices)
    # heads after tokens: both passes rewrite shape constants by value, and the head pass's new widths
    # (H'*Dh) could equal a token count; token counts equal to H are far rarer
    if any(plan.heads.values()):
        layout = "head_qkv" if blocks[0].layout == "neox_interleaved" else "qkv_head"
        remove_heads(graph, blocks, plan.heads, num_heads=H, head_dim=Dh, hidden=D, layout=layout)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    clear_shapes(graph)
    return graph


def _stub_untouched(graph: Any) -> set[str]:
    """Give every big constant still lazily held by the proto a data-less stub; returns their names."""
    from onnx import TensorProto
    from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

    from ..onnx_io import STUB_FILE

    gs = require("onnx_graphsurgeon", "ONNX surgery")
    names: set[str] = set()
    for t in graph.tensors().values():
        lazy = getattr(t, "_values", None) if isinstance(t, gs.Constant) else None
        if not isinstance(lazy, LazyValues) or isinstance(lazy, SparseValues) or lazy.tensor.name != t.name:
            continue
        src = lazy.tensor
        n = 1
        for d in src.dims:
            n *= d
        if n <= STUB_ELEMENTS:
            continue
        stub = TensorProto(name=src.name, data_type=src.data_type, dims=list(src.dims),
                           data_location=TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=STUB_FILE)
        t._values = LazyValues(stub)
        names.add(src.name)
    return names


def _check_light(light: Any) -> Any:
    """``onnx.checker`` full check + strict shape inference on a weightless copy; returns ``light`` with
    the inferred ``value_info``."""
    from ..onnx_io import check_light, light_model

    onnx = require("onnx", "ONNX surgery")
    check_light(light, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(light_model(light, keep_elements=1024), strict_mode=True)
    del light.graph.value_info[:]
    light.graph.value_info.extend(inferred.graph.value_info)
    return light


def _assemble(model: Any, light: Any, kept: set[str]) -> Any:
    """Turn ``model`` into the pruned model in place: ``light``'s graph, the stubs' data from ``model``."""
    g, lg = model.graph, light.graph
    for i in range(len(g.initializer) - 1, -1, -1):
        if g.initializer[i].name not in kept:
            del g.initializer[i]
    g.initializer.extend(t for t in lg.initializer if t.name not in kept)
    for field in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation",
                  "metadata_props"):
        if hasattr(g, field):
            del getattr(g, field)[:]
            getattr(g, field).extend(getattr(lg, field))
    g.name, g.doc_string = lg.name, lg.doc_string
    for field in ("opset_import", "metadata_props", "functions"):
        del getattr(model, field)[:]
        getattr(model, field).extend(getattr(light, field))
    return model


def _prune_in_place(model: Any, plan: Plan, int32_indices: bool, check: bool) -> Any:
    """The surgery, checks and assembly; ``model`` becomes the pruned model (returned)."""
    gs = require("onnx_graphsurgeon", "ONNX surgery")
    graph = _surgery(model, plan, int32_indices)
    kept = _stub_untouched(graph)
    light = gs.export_onnx(graph)
    del graph
    gc.collect()  # the graph's node <-> tensor cycles hold the proto's lazily read weights
    del light.opset_import[:]
    light.opset_import.extend(model.opset_import)
    del light.metadata_props[:]
    light.metadata_props.extend(model.metadata_props)
    metadata.set_plan(light, plan)
    try:
        light = _check_light(light)
    except Exception as exc:  # noqa: BLE001 - a surgery bug, not a user error
        raise UnsupportedGraph(f"the pruned graph does not pass the ONNX checker ({str(exc).splitlines()[0][:200]}): "
                               "please report this model") from exc
    if check:
        from .trt_rules import check_trt_rules

        from ..onnx_io import light_model

        bad = check_trt_rules(light_model(light, keep_elements=4096, stub=True), int32_indices=int32_indices)
        if bad:
            raise UnsupportedGraph(f"the pruned graph breaks a TensorRT rule: {bad[0]}")
    return _assemble(model, light, kept)


def prune_model(model: Any, plan: Plan, *, int32_indices: bool = False, check: bool = True) -> Any:
    """Surgery on an ``onnx.ModelProto`` (not modified): returns the pruned ``ModelProto``.

    ``int32_indices`` (default False): INT32 token indices for TensorRT 8.x; ``check`` (default True):
    TensorRT rules and an ONNX Runtime smoke run (the ONNX checker and strict shape inference always run).
    """
    onnx = require("onnx", "ONNX surgery")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    out = _prune_in_place(work, plan, int32_indices, check)
    if check:
        smoke_run(out)
    return out


def smoke_run(model: Any, batch: int = 2) -> list[np.ndarray]:
    """Run ``model`` (a ``ModelProto`` or a path) once on ONNX Runtime CPU with random inputs (batch ``batch``, default 2).

    Threads: ``OMP_NUM_THREADS`` when set, else ONNX Runtime's default. Raises UnsupportedGraph on
    non-finite outputs.
    """
    ort = require("onnxruntime", "the ONNX Runtime smoke run")
    so = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    so.intra_op_num_threads = int(threads) if threads.isdigit() else 0  # 0: ONNX Runtime's default (all cores)
    so.log_severity_level = 3
    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        if "int" in i.type:
            feed[i.name] = np.ones(shape, dtype=np.int64 if "int64" in i.type else np.int32)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    outs = sess.run(None, feed)
    for o in outs:
        if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o)):
            raise UnsupportedGraph("the pruned graph produces non-finite outputs on random inputs: please report this model")
    return outs


def prune(model_path_or_proto: Any, plan: Plan, out_path: str | os.PathLike, *, int32_indices: bool = False,
          check: bool = True) -> Path:
    """Apply ``plan`` to an ONNX model by surgery and write ``out_path`` atomically; returns the path.

    ``int32_indices`` (default False): INT32 token indices (TensorRT 8.x); ``check`` (default True):
    TensorRT rules and an ONNX Runtime smoke run. Refuses to write over the input.
    Raises PlanMismatch for a plan made for another model, UnsupportedGraph for a graph it cannot handle.
    """
    import shutil
    import tempfile

    from ..fileio import check_output_path
    from ..onnx_io import save_model

    model, src = _load(model_path_or_proto)
    target = check_output_path(out_path, *([src] if src else []))
    if src is None:  # a caller's proto: work on a copy
        onnx = require("onnx", "ONNX surgery")
        work = onnx.ModelProto()
        work.CopyFrom(model)
        model = work
    pruned = _prune_in_place(model, plan, int32_indices, check)
    del model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        built = save_model(pruned, tmpdir / target.name, source=src)
        del pruned  # the smoke run loads the file: the proto's memory is not needed any more
        gc.collect()
        if check:
            smoke_run(built)
        data = tmpdir / (target.name + ".data")
        if data.exists():
            os.replace(data, target.parent / data.name)
        os.replace(built, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target
