"""Pass pipeline, partition tags, Q/DQ insertion and calibration on a tiny hand-built KD graph.

The graph is built with onnx.helper (fast, deterministic): a teacher Conv-Relu-Conv, a student
that reads both the image (STFPM) and the teacher's first activation (PaSTe), and a head that
squares the feature difference into an anomaly map and a score.
"""

from __future__ import annotations

from dataclasses import replace

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from uadc.quant.calibrate import calibration_images, collect_ranges, tensors_to_calibrate
from uadc.core.errors import UadcError
from uadc.core.constants import PARTITION_KEY
from uadc.export.partitions import nodes_in, partition_counts, partition_of
from uadc.passes.pipeline import PassContext, check_numerics, partition_check, run_ort, run_passes
from uadc.passes.qdq import quantize_qdq
from uadc.config.targets import FLOAT_PASSES, get_target

C = 4  # channels


def _conv_w(rng, cout, cin):
    return (rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32)


def tiny_kd(seed: int = 0, with_bn: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(part, op, ins, out, **attrs):
        n = helper.make_node(op, ins, [out], name=f"{part}/{op}_{len(nodes)}", **attrs)
        n.metadata_props.add(key=PARTITION_KEY, value=part)
        nodes.append(n)
        return out

    def conv(part, x, name, cin):
        w = init(f"{name}.w", _conv_w(rng, C, cin))
        b = init(f"{name}.b", (rng.standard_normal(C) * 0.1).astype(np.float32))
        return node(part, "Conv", [x, w, b], name, pads=[1, 1, 1, 1])

    t1 = conv("teacher", "image", "t1", 3)
    if with_bn:  # foldable into the Conv by the simplifier
        bn = [init(f"bn.{k}", v.astype(np.float32)) for k, v in [
            ("scale", rng.uniform(0.5, 1.5, C)), ("bias", rng.standard_normal(C) * 0.1),
            ("mean", rng.standard_normal(C) * 0.1), ("var", rng.uniform(0.5, 1.5, C))]]
        t1 = node("teacher", "BatchNormalization", [t1, *bn], "t1bn")
    t1r = node("teacher", "Relu", [t1], "t1r")
    t2 = conv("teacher", t1r, "t2", C)
    s1 = conv("student", "image", "s1", 3)
    s1r = node("student", "Relu", [s1], "s1r")
    sa = node("student", "Add", [s1r, t1r], "sa")
    s2 = conv("student", sa, "s2", C)
    d = node("head", "Sub", [t2, s2], "d")
    d2 = node("head", "Mul", [d, d], "d2")
    am = node("head", "ReduceMean", [d2, init("axes_c", np.array([1], np.int64))], "anomaly_map", keepdims=1)
    node("head", "ReduceMax", [am, init("axes_all", np.array([1, 2, 3], np.int64))], "score", keepdims=0)
    graph = helper.make_graph(
        nodes, "tiny_kd", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, 8, 8]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    model.metadata_props.add(key="uadc.method", value="stfpm")
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)


def _ctx(target="ort-cpu-fp32", images=None, **kw) -> PassContext:
    feeds = {"image": images[:2]} if images is not None else None
    return PassContext(target=get_target(target), sample_feeds=feeds, **kw)


def _strip_tag(model: onnx.ModelProto, name: str, keep_prefix: bool = False) -> None:
    n = next(n for n in model.graph.node if n.name == name)
    kept = [(p.key, p.value) for p in n.metadata_props if p.key != PARTITION_KEY]
    del n.metadata_props[:]
    for k, v in kept:
        n.metadata_props.add(key=k, value=v)
    if not keep_prefix:
        n.name = name.split("/", 1)[1]


# ------------------------------------------------------------------------------ pipeline

def test_run_passes_records_and_dumps(tmp_path, images):
    model = tiny_kd(with_bn=True)
    out, records = run_passes(model, FLOAT_PASSES, _ctx(images=images, dump_dir=tmp_path))
    assert [r["name"] for r in records] == FLOAT_PASSES
    for r in records:
        assert set(r) == {"name", "seconds", "nodes_before", "nodes_after"} and r["seconds"] >= 0
    simplify = records[1]
    assert simplify["nodes_before"] == 12 and simplify["nodes_after"] == 11  # BN folded into the Conv
    assert records[-1]["nodes_after"] == len(out.graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == [      # and the model they started from
        "00_input.onnx", "01_shape_inference.onnx", "02_simplify.onnx", "03_partition_check.onnx", "04_knn_bank.onnx",
        "05_cleanup.onnx", "passes.json"]
    assert len(onnx.load(tmp_path / "02_simplify.onnx").graph.node) == 11
    run_passes(model, FLOAT_PASSES[:2], _ctx(images=images, dump_dir=tmp_path))   # an earlier dump's are replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_input.onnx", "01_shape_inference.onnx", "02_simplify.onnx", "passes.json"]
    from uadc.passes import pipeline

    def stopped(*a, **k):
        raise KeyboardInterrupt
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}   # a stop half-way deleted the earlier dump's
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):   # files and left a passes.json of
        mp.setitem(pipeline.PASSES, "cleanup", stopped)                            # passes it did not hold
        run_passes(model, FLOAT_PASSES, _ctx(images=images, dump_dir=tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not [p for p in tmp_path.parent.iterdir() if ".uadc-tmp-" in p.name]

    def missing(*a, **k):   # a pass's own OSError stays its own (it read "cannot write <dump folder>")
        raise FileNotFoundError(2, "No such file or directory", "/data/calib/x.png")
    with pytest.MonkeyPatch.context() as mp, pytest.raises(FileNotFoundError, match="x.png"):
        mp.setitem(pipeline.PASSES, "cleanup", missing)
        run_passes(model, FLOAT_PASSES, _ctx(images=images, dump_dir=tmp_path))
    (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)   # the swap replaced the link with a folder
    with pytest.raises(UadcError, match=r"-link: a symbolic link; give the folder it points to"):
        run_passes(model, FLOAT_PASSES, _ctx(images=images, dump_dir=tmp_path.parent / f"{tmp_path.name}-link"))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(UadcError, match=r"the current folder or one above it"):
        mp.chdir(tmp_path)   # `--dump-passes .`: the compile went on in a deleted folder (a traceback)
        run_passes(model, FLOAT_PASSES, _ctx(images=images, dump_dir=type(tmp_path)(".")))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "passes.json").unlink()   # a folder of models named like dumps is not replaced
    with pytest.raises(UadcError, match="a folder holding 00_input.onnx, not an earlier dump"):
        run_passes(model, FLOAT_PASSES, _ctx(images=images, dump_dir=tmp_path))
    assert len(list(tmp_path.iterdir())) == 3
    from uadc.config.recipe import recipe_from_dict
    from uadc.passes.pipeline import check_dump_dir
    art = tmp_path / "art"   # another artifact's folder: its next compile refused the dumps as a user's files
    art.mkdir()
    (art / "artifact.json").write_text("{}")
    with pytest.raises(UadcError, match=rf"^--dump-passes {art / 'sub'}: inside the artifact folder {art}; "):
        check_dump_dir(art / "sub")
    data = tmp_path / "data" / "a" / "train" / "good"   # the recipe's data: read back as images
    data.mkdir(parents=True)
    recipe = recipe_from_dict({"data": {"sources": [{"root": str(tmp_path / "data")}], "image_size": 32}})
    with pytest.raises(UadcError, match=rf"^--dump-passes {data / 'dumps'}: inside the recipe's data folder "):
        check_dump_dir(data / "dumps", recipe)
    # tags, model metadata and the dynamic batch survive the simplifier
    assert all(partition_of(n) and n.name.startswith(partition_of(n) + "/") for n in out.graph.node)
    assert all(any(p.key == PARTITION_KEY for p in n.metadata_props) for n in out.graph.node)
    assert partition_counts(out) == {"teacher": 3, "student": 4, "head": 4}
    assert any(p.key == "uadc.method" for p in out.metadata_props)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = images[:5]
    for a, b in zip(run_ort(model, {"image": x}), run_ort(out, {"image": x})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_pass_lists_available():
    with pytest.raises(UadcError, match="available: .*simplify.*qdq"):
        run_passes(tiny_kd(), ["shape_inference", "fold_everything"], _ctx())


def test_numeric_check_catches_a_broken_pass(images):
    model = tiny_kd()
    feeds = {"image": images[:2]}

    def nudged(delta):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        w = next(i for i in m.graph.initializer if i.name == "s2.w")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + np.float32(delta), w.name))
        return m

    assert check_numerics(model, nudged(1e-7), feeds) < 1e-4  # float noise passes
    with pytest.raises(UadcError, match="changed numerics beyond float noise"):
        check_numerics(model, nudged(0.05), feeds, what="broken_pass")


def test_simplify_falls_back_and_rejects_numeric_changes(images, monkeypatch):
    import uadc.passes.pipeline as passes

    model = tiny_kd(with_bn=True)
    ctx = _ctx(images=images)

    def crash(m, feeds):
        raise RuntimeError("onnxsim exploded")

    monkeypatch.setattr(passes, "_onnxsim", crash)
    out = passes.simplify(model, ctx)  # onnxslim takes over
    assert len(out.graph.node) == 11 and "untagged" not in partition_counts(out)

    slim = passes._onnxslim

    def broken(m, feeds):  # a "simplifier" that silently changes a weight
        m = slim(m, feeds)
        w = next(i for i in m.graph.initializer if i.name == "s2.w")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.1), w.name))
        return m

    monkeypatch.setattr(passes, "_onnxslim", broken)
    with pytest.raises(UadcError, match="simplify failed.*changed numerics beyond float noise"):
        passes.simplify(model, ctx)


# ---------------------------------------------------------------------------- partitions

def test_partition_check_repairs_lost_tags():
    model = tiny_kd()
    _strip_tag(model, "student/Relu_4")                   # name and metadata lost: producers -> student
    _strip_tag(model, "head/Sub_7")                       # teacher+student producers -> consumers: head
    _strip_tag(model, "teacher/Conv_0", keep_prefix=True)  # metadata lost, prefix kept
    out = partition_check(model, _ctx())
    by_op = {(n.op_type, n.output[0]): n for n in out.graph.node}
    for key, want in [(("Relu", "s1r"), "student"), (("Sub", "d"), "head"), (("Conv", "t1"), "teacher")]:
        n = by_op[key]
        assert partition_of(n) == want and n.name.startswith(f"{want}/")
        assert [p.value for p in n.metadata_props if p.key == PARTITION_KEY] == [want]
    assert partition_counts(out) == {"teacher": 3, "student": 4, "head": 4}


def test_partition_check_fails_on_orphan():
    model = tiny_kd()
    model.graph.node.append(helper.make_node("Identity", ["image"], ["stray"], name="stray"))
    model.graph.output.append(helper.make_tensor_value_info("stray", TensorProto.FLOAT, None))
    with pytest.raises(UadcError, match="no partition.*stray"):
        partition_check(model, _ctx())


# --------------------------------------------------------------------------------- Q/DQ

def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _assert_qdq_only_on_student(model, reference):
    prod = _producers(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(partition_of(n) == "student" for n in qdq)
    for n in model.graph.node:
        part = partition_of(n)
        for t in n.input:
            dq = prod.get(t)
            if part == "student" or dq is None or dq.op_type != "DequantizeLinear":
                continue
            assert part == "head", f"{n.name} reads fake-quantized {t}"
            q = prod[dq.input[0]]
            assert partition_of(prod[q.input[0]]) == "student"  # boundary: the student's own output
    # the teacher and head sub-graphs are untouched
    for part in ("teacher", "head"):
        def ops(m):
            return sorted(n.op_type for n in m.graph.node if partition_of(n) == part)
        assert ops(model) == ops(reference)
    teacher_inputs = {t for n in model.graph.node if partition_of(n) == "teacher" for t in n.input}
    assert teacher_inputs == {t for n in reference.graph.node if partition_of(n) == "teacher" for t in n.input}


def _calibrated_parts(model, images, parts, target="ort-cpu-int8"):
    scheme = get_target(target).scheme
    names = tensors_to_calibrate(model, parts)
    return collect_ranges(model, images, names, "minmax", activation_symmetric=scheme.activation_symmetric)


def _calibrated(model, images, target):
    return _calibrated_parts(model, images, ["student"], target)


@pytest.mark.parametrize("target, per_channel", [("ort-cpu-int8", None), ("ort-cpu-int8", False),
                                                 ("trt-int8", None)])
def test_qdq_only_student(images, target, per_channel):
    model = tiny_kd()
    ranges = _calibrated(model, images, target)
    ctx = _ctx(target, images=images, ranges=ranges, per_channel=per_channel)
    out, records = run_passes(model, get_target(target).passes, ctx)
    assert records[3]["name"] == "qdq" and records[3]["nodes_after"] > records[3]["nodes_before"]
    _assert_qdq_only_on_student(out, model)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    acts = [n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert {n.input[0] for n in acts} >= {"image", "t1r"}  # student's input quantization
    zero_points = [inits[n.input[2]] for n in acts]
    weight_dq = {n.input[0].removesuffix("_QuantizeLinear_Output").removesuffix("_quantized"): n
                 for n in out.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0].removesuffix("_QuantizeLinear_Output").removesuffix("_quantized") in ("s1.w", "s2.w")}
    assert set(weight_dq) == {"s1.w", "s2.w"}
    if target == "trt-int8":
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
        for dq in weight_dq.values():
            axis = next(a.i for a in dq.attribute if a.name == "axis")
            assert axis == 0 and inits[dq.input[1]].shape == (C,)         # per output channel
            assert inits[dq.input[2]].dtype == np.int8 and not inits[dq.input[2]].any()
        assert all(i.data_type != TensorProto.INT32 for i in out.graph.initializer)  # float biases
    else:
        assert all(z.dtype == np.uint8 for z in zero_points)
        channel_wise = get_target(target).scheme.per_channel if per_channel is None else per_channel
        sizes = {inits[dq.input[1]].size for dq in weight_dq.values()}
        assert sizes == ({C} if channel_wise else {1})  # the target's (or the overridden) weight scales
    x = images
    for a, b in zip(run_ort(model, {"image": x}), run_ort(out, {"image": x}, optimize=True)):
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_qdq_student_and_head(images):
    model = tiny_kd()
    names = tensors_to_calibrate(model, ["student", "head"])
    assert {"d", "d2"} <= set(names) and "t2" not in names  # Mul is quantized, Sub is not
    ranges = collect_ranges(model, images, names, "minmax")
    out = quantize_qdq(model, _ctx("ort-cpu-int8", ranges=ranges, quantize_partitions=["student", "head"]))
    prod = _producers(out)
    qdq = [n for n in out.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {partition_of(n) for n in qdq} == {"student", "head"}
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert prod[mul.input[0]].op_type == "DequantizeLinear" and partition_of(prod[mul.input[0]]) == "head"
    for n in out.graph.node:
        if partition_of(n) == "teacher":
            assert all(prod.get(t) is None or prod[t].op_type != "DequantizeLinear" for t in n.input)


@pytest.mark.parametrize("target", ["ort-cpu-int8", "trt-int8"])
@pytest.mark.parametrize("per_channel", [None, False])
def test_weight_params_from_one_quantization_give_the_same_model(images, per_channel, target):
    """The precision search feeds the weight scales ORT computed once back to every candidate: the
    candidate must come out byte for byte as ORT builds it alone, and the scales must be used
    (TensorRT's scheme keeps float weights behind a Q/DQ pair: the scales are read from its Q)."""
    from uadc.passes.qdq import weight_quant_params

    model = tiny_kd()
    ranges = _calibrated_parts(model, images, ["teacher", "student"], target)
    full = quantize_qdq(model, _ctx(target, ranges=ranges, per_channel=per_channel,
                                    quantize_partitions=["teacher", "student"]))
    params = weight_quant_params(full)
    assert {"t1.w", "t2.w", "s1.w", "s2.w"} <= set(params)
    assert len(params["s1.w"]) == (C if per_channel is None else 1)
    ctx = _ctx(target, ranges=ranges, per_channel=per_channel, quantize_partitions=["student"])
    alone = quantize_qdq(model, ctx)
    reused = quantize_qdq(model, replace(ctx, weight_params=params))
    assert reused.SerializeToString() == alone.SerializeToString()
    doubled = {k: [{**e, "scale": e["scale"] * 2} for e in v] for k, v in params.items()}
    changed = weight_quant_params(quantize_qdq(model, replace(ctx, weight_params=doubled)))
    np.testing.assert_allclose([e["scale"] for e in changed["s1.w"]], [e["scale"] * 2 for e in params["s1.w"]])


@pytest.mark.parametrize("per_channel", [None, False])
def test_weight_memo_gives_the_same_models_and_quantizes_each_weight_once(images, per_channel):
    """The precision search shares ORT's integer weights between candidates (``PassContext.weight_memo``):
    every candidate must come out byte for byte as ORT builds it alone, ORT's function must be back
    afterwards, and a second candidate must find its weights in the memo."""
    from onnxruntime.quantization import qdq_quantizer as ortq

    original = getattr(ortq, "quantize_onnx_initializer", None)
    if original is None:
        import onnxruntime
        pytest.skip(f"ONNX Runtime {onnxruntime.__version__} does not quantize weights through quantize_onnx_initializer")
    model = tiny_kd()
    ranges = _calibrated_parts(model, images, ["teacher", "student"], "ort-cpu-int8")
    memo: dict = {}
    for parts in (["teacher", "student"], ["student"], ["teacher", "student"]):
        ctx = _ctx("ort-cpu-int8", ranges=ranges, per_channel=per_channel, quantize_partitions=parts)
        alone = quantize_qdq(model, ctx)
        before = len(memo)
        shared = quantize_qdq(model, replace(ctx, weight_memo=memo))
        assert ortq.quantize_onnx_initializer is original
        assert shared.SerializeToString() == alone.SerializeToString()
        if parts == ["teacher", "student"] and before == 0:
            assert len(memo) == 4  # t1, t2, s1, s2
        else:  # every weight came from the memo
            assert len(memo) == before == 4

def test_qdq_missing_range_names_tensor(images):
    model = tiny_kd()
    ranges = _calibrated(model, images, "ort-cpu-int8")
    del ranges["t1r"]
    with pytest.raises(UadcError, match="no calibrated range for tensor 't1r'"):
        quantize_qdq(model, _ctx("ort-cpu-int8", ranges=ranges))
    with pytest.raises(UadcError, match="calibrated activation ranges"):
        quantize_qdq(model, _ctx("ort-cpu-int8"))


def test_fp16_pass_keeps_partitions_and_io(images):
    model = tiny_kd()
    out, _ = run_passes(model, ["fp16", "cleanup"], _ctx())
    assert "untagged" not in partition_counts(out)
    assert nodes_in(out, ["teacher", "student", "head"]) == [n.name for n in out.graph.node]
    ref, got = run_ort(model, {"image": images}), run_ort(out, {"image": images})
    assert all(g.dtype == np.float32 for g in got)
    for a, b in zip(ref, got):
        assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_cleanup_drops_dead_code():
    model = tiny_kd()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    dead = helper.make_node("Relu", ["t2"], ["nobody_reads"], name="head/dead")
    model.graph.node.append(dead)
    out, rec = run_passes(model, ["cleanup"], _ctx())
    assert rec[0]["nodes_before"] == 12 and rec[0]["nodes_after"] == 11
    assert "unused" not in {i.name for i in out.graph.initializer}


# ---------------------------------------------------------------------------- calibration

def _relu_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["image"], ["r"], name="student/relu"),
             helper.make_node("Mul", ["image", "two"], ["m"], name="student/mul"),
             helper.make_node("Add", ["r", "m"], ["out"], name="head/add")]
    for n in nodes:
        n.metadata_props.add(key=PARTITION_KEY, value=n.name.split("/")[0])
    graph = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.float32(2.0), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_collect_ranges_minmax():
    x = np.random.default_rng(3).standard_normal((7, 3, 4, 4)).astype(np.float32)
    model = _relu_model()
    names = tensors_to_calibrate(model, ["student"])
    assert names == ["image", "r", "m"]  # the initializer "two" and head tensors are not
    r = collect_ranges(model, x, names, "minmax", batch_size=3)  # 3 + 3 + 1 images
    assert r["r"] == (0.0, pytest.approx(float(x.max())))
    assert r["m"] == (pytest.approx(2 * float(x.min())), pytest.approx(2 * float(x.max())))
    assert all(type(v) is float for pair in r.values() for v in pair)
    sym = collect_ranges(model, x, ["m"], "minmax", activation_symmetric=True)
    a = 2 * float(np.abs(x).max())
    assert sym["m"] == (pytest.approx(-a), pytest.approx(a))
    # a symmetric calibrator on a never-negative tensor, asymmetric scheme: lo clipped to 0
    clipped = collect_ranges(model, x, ["r"], "minmax", options={"symmetric": True})
    assert clipped["r"] == (0.0, pytest.approx(float(x.max())))


@pytest.mark.parametrize("lo, hi, warned", [(0.0, 0.0, "next to no width against"),
                                            (-1e-40, 1e-40, "next to no width against"), (0.0, 1e-5, "next to no width against"),
                                            (-1e30, 1e30, "over 10 times the size of"), (-1e2, 1e2, "over 10 times the size of"),
                                            (-3.0, 3.0, None), (5.0, 5.0, None)])
def test_a_range_of_zero_width_or_far_wider_than_the_values_is_warned_about(lo, hi, warned, monkeypatch, caplog):
    """A plug-in's (0, 0) or (-1e38, 1e38) compiled without a word: ONNX Runtime quantized the tensor with
    scale 1, or to zero, and calibration.json named ranges the model did not use."""
    from uadc.calibrators import base
    from uadc.calibrators.base import Calibrator, register
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register("qa-fixed")(type("QAFixed", (Calibrator,), {"observe": lambda self, x: None,
                                                         "compute_range": lambda self: (lo, hi)}))
    x = np.random.default_rng(3).standard_normal((4, 3, 4, 4)).astype(np.float32)
    with caplog.at_level("WARNING", logger="uadc"):
        collect_ranges(_relu_model(), x, ["m"], "qa-fixed")
        collect_ranges(_relu_model(), x, ["m"], "minmax")
    said = [r.getMessage() for r in caplog.records]
    assert said == ([f"calibrator 'qa-fixed': 1 tensor(s) got a range of {warned} the values observed "
                     f"(m: ({lo:.6g}, {hi:.6g}), values {2 * x.min():.6g}..{2 * x.max():.6g}): its INT8 steps cannot "
                     f"tell those values apart; the compile's figures show the cost"] if warned else [])
    caplog.clear()   # a saturated tensor, a constant one: a built-in's (-1, 1) or (c, c) is not warned about
    with caplog.at_level("WARNING", logger="uadc"):
        for name in ("minmax", "entropy", "percentile", "mse"):
            for sym in (False, True):
                for tensor in (x * 1e-6 + 5, np.ones_like(x), np.full_like(x, -2.0)):
                    collect_ranges(_relu_model(), tensor, ["image", "m"], name, activation_symmetric=sym)
    assert not caplog.records


def test_tensors_to_calibrate_tiny_kd():
    assert set(tensors_to_calibrate(tiny_kd(), ["student"])) == {"image", "s1", "s1r", "t1r", "sa", "s2"}


def test_calibration_images():
    seen = []

    def load(idx):
        seen.append(idx)
        return np.stack([np.full((3, 8, 8), i, np.float32) for i in idx])

    a = calibration_images("train", 5, seed=0, train_images=load, num_train=20, image_size=8)
    b = calibration_images("train", 5, seed=0, train_images=load, num_train=20, image_size=8)
    c = calibration_images("train", 5, seed=1, train_images=load, num_train=20, image_size=8)
    assert a.shape == (5, 3, 8, 8) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert all(0 <= i < 20 for i in seen[0]) and len(set(seen[0])) == 5
    rn = calibration_images("random-normal", 4, seed=0, train_images=None, num_train=0, image_size=8)
    assert rn.shape == (4, 3, 8, 8) and rn.dtype == np.float32
    assert np.array_equal(rn, calibration_images("random-normal", 4, 0, None, 0, 8))
    assert not np.array_equal(rn, calibration_images("random-normal", 4, 1, None, 0, 8))
    mixed = calibration_images("mixed", 6, seed=0, train_images=load, num_train=20, image_size=8)
    is_train = np.array([np.all(m == m.flat[0]) for m in mixed])
    assert mixed.shape == (6, 3, 8, 8) and is_train.sum() == 3
    with pytest.raises(UadcError, match="unknown calibration data kind"):
        calibration_images("imagenet", 4, 0, None, 0, 8)
    with pytest.raises(UadcError, match="training set"):
        calibration_images("train", 4, 0, None, 0, 8)


# ------------------------------------------------------------------------------ opset / fp16 targets

@pytest.mark.parametrize("target", ["jetson-fp32", "trt-fp16", "jetson-fp16"])
def test_tensorrt_float_targets_ship_their_opset_and_type(target, images):
    """Target.opset and the fp16 pass drive the model: opset 17 for TensorRT 8.5, FP16-typed
    weights with float32 I/O for FP16 targets (TensorRT 11 has no FP16 builder flag)."""
    from uadc.passes.pipeline import opset_of, run_ort

    t = get_target(target)
    model = tiny_kd()
    out, _ = run_passes(model, t.passes, _ctx(target, images))
    assert opset_of(out) == t.opset == 17
    reduce_nodes = [n for n in out.graph.node if n.op_type in ("ReduceMean", "ReduceMax")]
    assert reduce_nodes and all(len(n.input) == 1 and any(a.name == "axes" for a in n.attribute)
                                for n in reduce_nodes)
    half = any(i.data_type == TensorProto.FLOAT16 for i in out.graph.initializer)
    assert half == (t.precision == "fp16")
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in out.graph.output)
    ref, new = run_ort(model, {"image": images}), run_ort(out, {"image": images})
    tol = 2e-2 if half else 1e-5
    for a, b in zip(ref, new):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * max(1.0, float(np.abs(a).max())))


def test_opset_pass_rewrites_pad_and_resize_and_refuses_what_has_no_opset17_form(images):
    from uadc.passes.opset import convert_opset
    from uadc.passes.pipeline import opset_of, run_ort

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 20, 20])
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Pad", ["image", "pads"], ["p"], name="head/pad", mode="reflect"),
             helper.make_node("Resize", ["p", "", "scales"], ["out"], name="head/resize", mode="linear",
                              antialias=0, keep_aspect_ratio_policy="stretch")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    out = convert_opset(model, _ctx("jetson-fp32", images))
    assert opset_of(out) == 17
    np.testing.assert_allclose(run_ort(out, {"image": images})[0], run_ort(model, {"image": images})[0])
    model.graph.node[1].attribute.append(helper.make_attribute("axes", [2, 3]))
    with pytest.raises(UadcError, match="Resize.*axes, new in opset 18"):
        convert_opset(model, _ctx("jetson-fp32", images))


def _saturating_conv(weight_bits_8: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A 1x1 convolution whose U8S8 pair sums overflow int16 with 8-bit weights: all-positive inputs
    near the top of their range (u8 ~255) times equal weights (s8 127): 2 * 255 * 127 > 32767."""
    w = numpy_helper.from_array(np.ones((4, 8, 1, 1), np.float32), "s.w")
    conv = helper.make_node("Conv", ["image", "s.w"], ["map"], name="student/Conv_0")
    conv.metadata_props.add(key=PARTITION_KEY, value="student")
    graph = helper.make_graph([conv], "sat", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("map", TensorProto.FLOAT, [1, 4, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    ranges = {"image": (0.0, 1.0), "map": (0.0, 8.0)}
    ctx = _ctx("ort-cpu-int8", ranges=ranges, reduce_range=False if weight_bits_8 else None)
    return model, quantize_qdq(model, ctx)


def _ort_exact(model, feeds, exact: bool):
    """ONNX Runtime CPU; ``exact``: its U8U8 path (``session.x64quantprecision``), which never saturates."""
    from uadc.core.ort_session import make_session
    config = {"session.x64quantprecision": "1"} if exact else None
    return make_session(model, config=config).run(None, feeds)[0]


def test_cpu_int8_weights_take_7_bits_so_no_cpu_saturates():
    """ORT CPU INT8 targets quantize weights to 7 bits (ORT's reduce_range): on x86 CPUs without VNNI
    the fast U8S8 kernel sums pairs of products in int16, which 8-bit weights can overflow; 7-bit
    ones cannot, so every CPU computes what the exact kernel does (on a VNNI CPU both paths are exact;
    on an AVX2-only one the 8-bit model of ``_saturating_conv`` gives other numbers)."""
    from uadc.passes.qdq import weight_bits
    assert weight_bits(_ctx("ort-cpu-int8")) == 7 and weight_bits(_ctx("trt-int8")) == 8
    assert weight_bits(_ctx("ort-cpu-int8", reduce_range=False)) == 8
    assert weight_bits(_ctx("trt-int8", reduce_range=True)) == 8  # a recipe's switch is for the CPU targets
    feeds = {"image": np.full((1, 8, 4, 4), 0.99, np.float32)}
    for eight in (False, True):
        model, q = _saturating_conv(eight)
        weights = [numpy_helper.to_array(i) for i in q.graph.initializer if i.data_type == TensorProto.INT8]
        assert weights and max(int(np.abs(w).max()) for w in weights) == (127 if eight else 64)
        exact = _ort_exact(q, feeds, True)
        np.testing.assert_allclose(exact, run_ort(model, feeds)[0], atol=8 / 255 + 1e-6)
        if not eight:  # measured on an AVX2-only CPU: the 8-bit model's fast path gave 4.05 for 7.91
            np.testing.assert_array_equal(_ort_exact(q, feeds, False), exact)


def test_native_lines_written_while_onnxsim_probes_go_to_the_debug_log(images, monkeypatch, capfd, caplog):
    """ONNX Runtime, run inside onnxsim, printed its own colour-coded C++ error line on every US compile (and
    uadc a warning for the fallback that then worked): the command line's stderr carries uadc's own lines only.
    (A library call leaves fd 2 to the app, whose other threads write there too: test_api.py.)"""
    import logging
    import os

    import onnxsim
    from uadc.core import scoped
    from uadc.passes import pipeline as P
    monkeypatch.setattr(scoped, "_OWNED", True)   # as while `uadc compile` runs

    def noisy(model, **kwargs):
        os.write(2, b"\x1b[1;31m[E:onnxruntime:, sequential_executor.cc] Scale value should be greater than 0\n")
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL")
    monkeypatch.setattr(onnxsim, "simplify", noisy)
    logger = logging.getLogger("uadc")   # as a script has it (a CLI test in this process may have set it up)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.DEBUG, logger="uadc"):
        out = P.simplify(tiny_kd(with_bn=True), _ctx(images=images))   # onnxslim takes over
    assert len(out.graph.node) > 0 and capfd.readouterr().err == ""
    logged = [r.getMessage() for r in caplog.records]
    assert any("Scale value should be greater than 0" in m for m in logged)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_calibrators_failures_are_one_line_naming_it(monkeypatch):
    """A plug-in raising in observe/compute_range was a traceback; a 3-tuple or strings read as "no finite
    values", its NaN as an anonymous qdq error."""
    from uadc.calibrators import Calibrator, base
    from uadc.core.errors import UadcError
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4)).astype(np.float32)
    model = _relu_model()
    cases = {"boom-range": (lambda s: 1 / 0, "compute_range of tensor 'image' failed: ZeroDivisionError"),
             "three": (lambda s: (0.0, 1.0, 2.0), "returned (0.0, 1.0, 2.0) for tensor 'image'; expected (lo, hi)"),
             "words": (lambda s: ("a", "b"), "returned ('a', 'b') for tensor 'image'"),
             "nan": (lambda s: (float("nan"), 1.0), "returned (nan, 1.0) for tensor 'image'; expected finite"),
             "inverted": (lambda s: (1.0, -1.0), "returned (1.0, -1.0)")}
    for name, (rng_fn, text) in cases.items():
        base.register(name)(type(name, (Calibrator,), {"observe": lambda s, v: None, "compute_range": rng_fn}))
        with pytest.raises(UadcError, match=re.escape(f"calibrator {name!r}: ") + ".*" + re.escape(text)):
            collect_ranges(model, x, ["image"], name)

    def observe(self, v):
        raise RuntimeError("plug-in bug")
    base.register("boom-observe")(type("B", (Calibrator,), {"observe": observe, "compute_range": lambda s: (0, 1)}))
    with pytest.raises(UadcError, match=r"calibrator 'boom-observe': observe of tensor 'image' failed: RuntimeError"):
        collect_ranges(model, x, ["image"], "boom-observe")


def test_more_training_samples_than_images_is_a_warning(caplog):
    """`--calib-data train --calib-samples 100` on 14 images recorded 100 samples, silently drawn with replacement."""
    imgs = lambda idx: np.zeros((len(idx), 3, 4, 4), np.float32)   # noqa: E731
    with caplog.at_level("WARNING", logger="uadc"):
        calibration_images("train", 4, 0, imgs, 14, 4)
        assert not caplog.records
        calibration_images("train", 100, 0, imgs, 14, 4)
    assert "100 samples drawn from 14 training images (with replacement: 14 distinct ones)" in caplog.text


def _normalised_head() -> onnx.ModelProto:
    """x / max(||x||, eps) as torch exports F.normalize: a Clip with a lower bound alone."""
    from uadc.export.partitions import set_partition
    nodes = [helper.make_node("ReduceL2", ["x", "axes"], ["n"], keepdims=1, name="head/norm"),
             helper.make_node("Clip", ["n", "eps"], ["c"], name="head/clamp_min"),
             helper.make_node("Div", ["x", "c"], ["y"], name="head/div")]
    for n in nodes:
        set_partition(n, "head")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 3, 3])],
                          [numpy_helper.from_array(np.array([1], np.int64), "axes"),
                           numpy_helper.from_array(np.array(1e-12, np.float32), "eps")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9   # ONNX Runtime 1.19 reads up to 10
    return model


def test_fp16_clips_with_a_lower_bound_alone_get_an_upper_one():
    """ONNX Runtime 1.19's FP16 Clip without max returns 0 (the CI's floor stage runs this on 1.19.2): every
    trt-fp16 / jetson-fp16 anomaly map was NaN there, and compile refused the model as numerically broken."""
    from uadc.passes.simulate import type_fp16
    model = _normalised_head()
    x = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
    ref = run_ort(model, {"x": x})[0]
    for half in (run_passes(model, ["fp16"], _ctx())[0], type_fp16(model, [n.name for n in model.graph.node])):
        clip = next(n for n in half.graph.node if n.op_type == "Clip")
        assert len(clip.input) == 3 and clip.input[2]
        got = run_ort(half, {"x": x})[0]
        assert np.isfinite(got).all() and np.abs(got - ref).max() < 1e-2


def test_an_activation_behind_an_op_the_quantizer_leaves_float_is_no_group():
    """RD's head clamps each norm (ReduceL2 -> Clip) and the image kNN its distance (ReduceMin -> Clip): ORT's
    quantizer never quantizes such a Clip, yet each was a group that precision auto could call INT8 (the report
    listed the head as quantized with no Q/DQ node in it)."""
    from uadc.passes.groups import fused_groups
    from uadc.passes.qdq import quantized_op_types
    model = _normalised_head()
    assert "Clip" in quantized_op_types()
    assert "head/clamp_min" not in [g.name for g in fused_groups(model, ["head"])]


def test_onnx_runtimes_quantizer_is_imported_leaving_sys_path_as_found():
    """Its import appended onnxruntime/transformers to sys.path for good: an app's `import metrics` (or
    `benchmark`, `models`, ...) then loaded ORT's module of that name."""
    import subprocess
    import sys
    code = ("import sys\nbefore = sys.path[:]\nfrom uadc.passes.qdq import quantized_op_types\n"
            "from uadc.quant.qat.placement import scale_to_range\nassert quantized_op_types()\n"
            "print(sys.path == before, [p for p in sys.path if p not in before])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "True []"


def test_a_plugin_that_changes_its_batch_or_the_process_is_contained(monkeypatch, tmp_path):
    """A plug-in's in-place np.abs(x, out=x) made every tensor look non-negative, so lo was clipped to 0 and pixel
    AUROC fell 0.985 -> 0.947 without a word; sys.exit in its constructor ended uadc with no line; its os.chdir and
    np.seterr outlived the calibration."""
    import os
    from uadc.calibrators import Calibrator, base
    from uadc.config.settings import PtqSettings
    from uadc.config.targets import get_target
    from uadc.core.errors import UadcError
    from uadc.quant.calibrate import calibrate_ranges
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    x = np.random.default_rng(3).standard_normal((4, 3, 4, 4)).astype(np.float32)

    class InPlace(Calibrator):
        def __init__(self):
            self.m = 0.0

        def observe(self, v):
            np.abs(v, out=v)
            self.m = max(self.m, float(v.max()))

        def compute_range(self):
            return -self.m, self.m

    class Meddles(InPlace):
        def compute_range(self):
            os.chdir(tmp_path)
            np.seterr(all="raise")
            return super().compute_range()
    base.register("inplace")(InPlace)
    base.register("meddles")(Meddles)
    lo, hi = collect_ranges(_relu_model(), x, ["image"], "inplace")["image"]
    assert lo == pytest.approx(-float(np.abs(x).max())) and hi == -lo
    folder, errors = os.getcwd(), np.geterr()
    try:
        calibrate_ranges(_relu_model(), x, PtqSettings("meddles", "train", 4, ("student",), None),
                         get_target("ort-cpu-int8"))
        assert (os.getcwd(), np.geterr()) == (folder, errors)
    finally:   # never past this test, whatever failed
        np.seterr(**errors)
        os.chdir(folder)

    class Exits(Calibrator):
        def __init__(self):
            raise SystemExit(3)
        observe = compute_range = None
    base.register("exits")(Exits)
    with pytest.raises(UadcError, match=r"calibrator 'exits': its constructor called sys.exit\(3\)"):
        collect_ranges(_relu_model(), x, ["image"], "exits")


def test_a_plugin_packages_helper_module_is_in_its_fingerprint(monkeypatch, tmp_path):
    """`calibrators compare` reused a cell's old ranges after a helper module of the plug-in's package changed."""
    import importlib
    from importlib.metadata import EntryPoint
    from uadc.calibrators import base, fingerprint
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    pkg = tmp_path / "qa_pkg_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from uadc.calibrators import Calibrator\nfrom . import helper\n"
                                     "class G(Calibrator):\n    def observe(self, x): pass\n"
                                     "    def compute_range(self): return helper.RANGE\n")
    (pkg / "helper.py").write_text("RANGE = (0.0, 1.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="qa-pkg", value="qa_pkg_plugin:G", group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base, "entry_points", lambda group: [ep] if group == ep.group else [])
    before = fingerprint("qa-pkg")
    (pkg / "helper.py").write_text("RANGE = (0.0, 0.05)\n")
    importlib.invalidate_caches()
    assert fingerprint("qa-pkg") != before


def test_a_pass_list_that_moves_or_drops_the_shared_passes_says_they_run_first(caplog):
    """`passes: [qdq, simplify, shape_inference, cleanup]` ran simplify first and recorded ["qdq", "cleanup"],
    without a word; leaving simplify out still ran it."""
    from types import SimpleNamespace

    from uadc.config.targets import get_target
    from uadc.pipeline.compile import CompileOptions, _pass_names
    target = get_target("ort-cpu-int8")
    for given, said in ((["qdq", "simplify", "shape_inference", "cleanup"], "(it has simplify, shape_inference)"),
                        (["partition_check", "qdq", "cleanup"], "(it has neither)"),
                        (["shape_inference", "simplify", "qdq", "cleanup"], None), (None, None)):
        base = SimpleNamespace(recipe=SimpleNamespace(compile=SimpleNamespace(passes=given)))
        caplog.clear()
        with caplog.at_level("WARNING", logger="uadc"):
            names = _pass_names(base, target, CompileOptions(target=target.name), warn=True)
        assert "simplify" not in names and "shape_inference" not in names
        assert (said in caplog.text and "run once on the shared FP32 export" in caplog.text) if said else \
            not caplog.text, (given, caplog.text)
