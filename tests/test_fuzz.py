"""Property-based tests (hypothesis, deterministic and bounded): whatever bytes or structures a
recipe or an ONNX file holds, the loaders answer with a value or a one-line UadcError, never
another exception, never a non-finite number or a name that leaves the artifacts root."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from uadc.core.errors import UadcError

# Deterministic (same examples on every run, no example database) and bounded in time.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

BASE = {"data": {"sources": [{"root": "data", "categories": ["a"]}], "image_size": 64},
        "model": {"method": "stfpm", "taps": ["blocks.1", "blocks.3"]}}
KEYS = {"": ["name", "seed", "data", "model", "train", "eval", "compile", "qat", "bogus"],
        "data": ["sources", "image_size", "normalization", "train_limit"],
        "model": ["method", "backbone", "pretrained", "weights", "taps", "split", "combine", "smoothing_sigma",
                  "students", "descriptor_dim", "student_width"],
        "train": ["epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "schedule", "warmup_epochs",
                  "cache_teacher", "threads"],
        "eval": ["batch_size"],
        "compile": ["target", "passes", "calibrator", "calib_data", "calib_samples", "quantize", "per_channel"],
        "qat": ["epochs", "lr", "batch_size"]}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["../../x", "/abs", ".hidden", "a/b", "stfpm", "student", "", "1e400"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _one_line(exc: UadcError) -> None:
    text = str(exc)
    assert "\n" not in text and 0 < len(text) <= 2000


def _check_valid(r, root: Path) -> None:
    """A recipe that loads is safe to act on: finite numbers, a name that stays under the root."""
    def walk(v):
        if isinstance(v, float):
            assert math.isfinite(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(r.cfg)
    d = r.artifact_dir(root).resolve()
    assert d.parent == root.resolve() and d.name == r.name


@FUZZ
@given(section=st.sampled_from(list(KEYS)), key_index=st.integers(0, 20), value=values)
def test_recipe_dict_fuzz(section, key_index, value, tmp_path_factory):
    """One key of a valid recipe set to anything: a Recipe or a one-line UadcError."""
    from uadc.config.recipe import recipe_from_dict
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    keys = KEYS[section]
    key = keys[key_index % len(keys)]
    if section:
        cfg.setdefault(section, {})[key] = value
    else:
        cfg[key] = value
    try:
        r = recipe_from_dict(cfg)
    except UadcError as exc:
        _one_line(exc)
        return
    _check_valid(r, Path("/tmp/uadc-fuzz-root"))


@FUZZ
@given(body=st.one_of(st.binary(max_size=400), st.text(max_size=400),
                      values.map(lambda v: yaml.safe_dump(v, allow_unicode=True))))
def test_recipe_file_fuzz(body, tmp_path_factory):
    """Any file content: a Recipe or a one-line UadcError (never a YAML/pydantic traceback)."""
    from uadc.config.recipe import load_recipe
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
    try:
        r = load_recipe(p)
    except UadcError as exc:
        _one_line(exc)
        return
    _check_valid(r, Path("/tmp/uadc-fuzz-root"))


@FUZZ
@given(depth=st.integers(1, 12), width=st.integers(1, 12))
def test_recipe_alias_bomb_bounded(depth, width, tmp_path_factory):
    """Nested YAML anchors expand to width**depth leaves but are answered quickly, in one line."""
    import time
    from uadc.config.recipe import load_recipe
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, depth)]
    p = tmp_path_factory.mktemp("bomb") / "r.yaml"
    p.write_text("\n".join(lines) + f"\ndata: {{sources: [{{root: *a{depth - 1}}}]}}\n")
    t0 = time.perf_counter()
    with pytest.raises(UadcError) as info:
        load_recipe(p)
    _one_line(info.value)
    assert time.perf_counter() - t0 < 5


# -- ONNX / check-trt ---------------------------------------------------------------------------------
def _qdq_model() -> bytes:
    """A small Q/DQ Conv model: the shape of what check-trt inspects."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


SEED_ONNX = _qdq_model()


def _check_file(path: Path) -> None:
    from uadc.backends.tensorrt.rules import check_trt_rules, format_violations
    from uadc.export.onnx_export import load_onnx
    try:
        model = load_onnx(path)
    except UadcError as exc:
        _one_line(exc)
        return
    try:
        violations = check_trt_rules(model)
    except UadcError as exc:
        _one_line(exc)
        return
    format_violations(violations)


def test_seed_model_is_clean(tmp_path):
    from uadc.backends.tensorrt.rules import check_trt_rules
    from uadc.export.onnx_export import load_onnx
    p = tmp_path / "m.onnx"
    p.write_bytes(SEED_ONNX)
    assert check_trt_rules(load_onnx(p)) == []


@FUZZ
@given(data=st.binary(max_size=2048))
def test_onnx_random_bytes(data, tmp_path_factory):
    p = tmp_path_factory.mktemp("onnx") / "m.onnx"
    p.write_bytes(data)
    _check_file(p)


@FUZZ
@given(cut=st.integers(0, len(SEED_ONNX)), flips=st.lists(st.tuples(st.integers(0, len(SEED_ONNX) - 1),
                                                                     st.integers(0, 255)), max_size=8))
def test_onnx_mutated(cut, flips, tmp_path_factory):
    """The seed model truncated and with bytes overwritten: parsed or refused in one line."""
    data = bytearray(SEED_ONNX)
    for i, b in flips:
        data[i] = b
    p = tmp_path_factory.mktemp("onnx") / "m.onnx"
    p.write_bytes(bytes(data[:cut] if cut else data))
    _check_file(p)


@FUZZ
@given(scale=st.floats(allow_nan=True, allow_infinity=True, width=32), zero=st.integers(-128, 127),
       axis=st.integers(-5, 5))
def test_onnx_qdq_params(scale, zero, axis, tmp_path_factory):
    """Any scale/zero point/axis in a Q/DQ pair: check-trt answers (violations or an error line)."""
    m = onnx.load_from_string(SEED_ONNX)
    for init in m.graph.initializer:
        if init.name == "s":
            init.CopyFrom(numpy_helper.from_array(np.float32(scale), "s"))
        if init.name == "z":
            init.CopyFrom(numpy_helper.from_array(np.int8(zero), "z"))
    for n in m.graph.node:
        if n.input and n.input[0] in ("w", "wq"):
            for a in n.attribute:
                if a.name == "axis":
                    a.i = axis
    p = tmp_path_factory.mktemp("onnx") / "m.onnx"
    p.write_bytes(m.SerializeToString())
    _check_file(p)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from("ab\\|*_`\n|"), max_size=12) | st.text(max_size=12))
def test_a_markdown_cell_shows_its_text(text):
    """GFM reads a table cell in two steps: ``\\|`` is a pipe inside the cell (an unescaped one ends it),
    then a backslash escapes the punctuation after it. A name holding ``a\\|b`` lost its backslash."""
    from uadc.core.errors import md_cell, one_line
    cell = md_cell(text)
    assert not re.search(r"(?<!\\)\|", cell)
    shown = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", cell.replace("\\|", "|"))
    assert shown == one_line(text)
