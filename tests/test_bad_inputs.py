"""The bad-input corpus (tests/bad_inputs/cases.py) through the CLI: every case gets its promised
exit code, one ``error:`` line and no traceback, and changes nothing outside its intended output
(snapshot with sha256 of the case folder and the shared fixture before and after).
README "Guarantees" names these tests."""

from __future__ import annotations

import os
import subprocess

import pytest

from bad_inputs.cases import CASES
from bad_inputs.harness import Env, Shared, diff, outcome_problems, run_cli, snapshot
from synthetic import make_tiny_recipe


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Shared:
    """One tiny trained model (32 px, 1 epoch) shared by every case, plus broken copies of it."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    root = tmp_path_factory.mktemp("corpus")
    recipe = make_tiny_recipe(root)
    data = root / "data"
    art = root / "art"
    res = run_cli(["-q", "train", str(recipe), "--artifacts", str(art)])
    assert res.exit_code == 0, res.output
    ckpt = art / "tiny" / "checkpoint.pt"
    blob = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in blob["state_dict"].items() if k.startswith("student.") and v.is_floating_point())
    broken = {}
    var = next(k for k in blob["state_dict"] if k.startswith("student.") and k.endswith("running_var"))
    for kind, value in (("nan", float("nan")), ("inf", float("inf")), ("huge", -1.0)):
        sd = {k: v.clone() for k, v in blob["state_dict"].items()}
        if kind == "huge":  # finite weights, NaN outputs: a negative batch-norm variance (sqrt < 0)
            sd[var].fill_(value)
        else:
            sd[key].view(-1)[0] = value
        broken[kind] = root / f"{kind}.pt"
        torch.save({**blob, "state_dict": sd}, broken[kind])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), root / "relu.onnx")
    return Shared(root, data, recipe, art, ckpt, broken["nan"], broken["inf"], broken["huge"], root / "relu.onnx")


@pytest.fixture(scope="session")
def shared_before(shared) -> dict:
    return snapshot(shared.root)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, shared, shared_before, tmp_path, monkeypatch):
    d = tmp_path / "case"
    d.mkdir()
    env = Env(d, shared)
    monkeypatch.chdir(d)
    if case.setup:
        case.setup(env)
    before, shared_meta = snapshot(d), snapshot(shared.root, content=False)
    res = run_cli(case.args(env))
    after = snapshot(d)
    for p in env.immutable:
        subprocess.run(["chattr", "-i", str(p)], check=True)
    for p in d.rglob("*"):  # let tmp_path's cleanup remove what a case made read-only
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    problems = outcome_problems(case, res)
    problems += [f"outside the intended output: {c}" for c in diff(before, after, case.allow)]
    problems += [f"shared fixture: {c}" for c in diff(shared_meta, snapshot(shared.root, content=False))]
    assert not problems, f"{case.id}: " + "\n".join(problems) + f"\n--- output ---\n{res.output[-3000:]}"
    if case.check:
        case.check(env, res)


def test_shared_fixture_untouched(shared, shared_before):
    """Runs last in this module: no case changed a byte of the shared data, recipe or checkpoints."""
    assert not diff(shared_before, snapshot(shared.root))


def test_finite_gate_names_weights_and_outputs():
    """The gate after export and after every target's passes: NaN weights are named; finite
    weights with NaN/Inf outputs are reported as outputs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from uadc.core.errors import UadcError
    from uadc.passes.pipeline import check_finite

    def model(w: float) -> onnx.ModelProto:
        g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "w"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.array([w], np.float32), "w")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    feeds = {"x": np.ones(1, np.float32)}
    check_finite(model(2.0), feeds, "ok")
    with pytest.raises(UadcError, match=r"stage: NaN/Inf in the model weights: w \(1 of 1\)"):
        check_finite(model(float("nan")), feeds, "stage")
    with pytest.raises(UadcError, match=r"stage: the model outputs NaN/Inf \('y'\)"):
        check_finite(model(1e30), feeds, "stage")


def test_report_json_is_strict_and_folders_follow_umask(tmp_path):
    """report.json never holds a bare NaN (not JSON); artifact folders are not 0700."""
    import json

    from uadc.core.io import atomic_dir, atomic_write_json
    p = atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.0]})
    assert json.loads(p.read_text(), parse_constant=lambda c: 1 / 0) == {"a": None, "b": [None, 1.0]}
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "report.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_image_and_mask_modes(tmp_path):
    """16-bit PNGs are read at their gray levels (not saturated to white); 0/1 masks are binary."""
    import numpy as np
    from PIL import Image

    from uadc.data.mvtec import Sample, load_image, load_mask
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "i16.png")
    img = load_image(tmp_path / "i16.png", 32)
    assert abs(float(img.mean()) - 0.5) < 0.01 and img.min() == 0.0 and img.max() == 1.0
    mask = np.zeros((32, 32), np.uint8)
    mask[4:9, 4:9] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    s = Sample(tmp_path / "i16.png", "c", "blob", tmp_path / "m.png")
    assert load_mask(s, 32).sum() == 25
    # label masks (0/2, 0/100, 0/1/2): any non-zero value; they were "marks no pixel" errors
    mask[20:22, 20:30] = 2
    for scale in (1, 50):
        Image.fromarray(mask * scale).save(tmp_path / "m.png")
        assert load_mask(s, 32).sum() == 45
