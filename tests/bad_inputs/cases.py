"""The case table. Each case names the command, the expected exit code and error text, what it
may write, and (success cases) how its output is checked to be sound."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bad_inputs.harness import Case, Env

TARGETS = ("ort-cpu-fp32", "ort-cpu-int8", "trt-fp16", "trt-int8", "jetson-fp32", "jetson-fp16", "jetson-int8")
MARKER = "PWNED"  # a crafted file that ran a command would create this file in the case folder


# -- helpers ---------------------------------------------------------------------------------------
def _cfg(e: Env) -> dict:
    return yaml.safe_load(e.s.recipe.read_text())


def recipe(e: Env, fname: str = "r.yaml", **sections) -> Path:
    """The shared recipe with ``section={key: value}`` overrides, written into the case folder."""
    cfg = _cfg(e)
    for k, v in sections.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    p = e.d / fname
    p.write_text(yaml.safe_dump(cfg))
    return p


def text(name: str, body: str | bytes):
    def setup(e: Env) -> None:
        p = e.d / name
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
    return setup


def data_copy(e: Env) -> Path:
    return Path(shutil.copytree(e.s.data, e.d / "data"))


def with_data(change):
    """Copy the data into the case folder, apply ``change(data_root)``, and point r.yaml at it."""
    def setup(e: Env) -> None:
        root = data_copy(e)
        change(root)
        cfg = _cfg(e)
        cfg["data"]["sources"] = [{"root": str(root), "categories": ["stripes", "gray"]}]
        (e.d / "r.yaml").write_text(yaml.safe_dump(cfg))
    return setup


class _RunsCommand:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_torch(e: Env) -> None:
    import torch
    torch.save({"state_dict": {}, "recipe": {}, "x": _RunsCommand(e.d / MARKER)}, e.d / "evil.pt")


def crafted_pickle(e: Env) -> None:
    (e.d / "evil.pt").write_bytes(pickle.dumps(_RunsCommand(e.d / MARKER)))


def crafted_in_zip(e: Env) -> None:
    """A real checkpoint whose data.pkl is replaced by the command-running pickle."""
    src = zipfile.ZipFile(e.s.ckpt)
    with zipfile.ZipFile(e.d / "evil.pt", "w") as z:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("data.pkl"):
                body = pickle.dumps(_RunsCommand(e.d / MARKER), protocol=2)
            z.writestr(info, body)


def no_marker(e: Env, res) -> None:
    assert not (e.d / MARKER).exists(), "the crafted file ran a command"


def ckpt_blob(e: Env, change, name: str = "c.pt") -> None:
    import torch
    blob = torch.load(e.s.ckpt, weights_only=True)
    blob = change(blob)
    torch.save(blob, e.d / name)


def mkdir_files(path: str, files: dict[str, str]):
    def setup(e: Env) -> None:
        d = e.d / path
        d.mkdir(parents=True, exist_ok=True)
        for k, v in files.items():
            (d / k).write_text(v)
    return setup


def readonly(path: str):
    """Read-only for everyone: mode 0555, and immutable (chattr +i) where we run as root, for
    whom mode bits do not stop writes."""
    def setup(e: Env) -> None:
        d = e.d / path
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o555)
        if os.geteuid() == 0:
            import subprocess
            subprocess.run(["chattr", "+i", str(d)], check=True)
            e.immutable.append(d)
    return setup


def both(*setups):
    def setup(e: Env) -> None:
        for s in setups:
            s(e)
    return setup


def onnx_bytes(e: Env) -> bytes:
    return e.s.onnx.read_bytes()


def _save_png16(p: Path) -> None:
    with Image.open(p) as im:
        a = np.asarray(im.convert("L"), np.uint16) * 257
    Image.fromarray(a).save(p)  # mode I;16


def _masks_zero_one(root: Path) -> None:
    for p in root.glob("*/ground_truth/*/*.png"):
        with Image.open(p) as m:
            a = (np.asarray(m) > 127).astype(np.uint8)
        Image.fromarray(a).save(p)


def _masks_empty(root: Path) -> None:
    for p in root.glob("gray/ground_truth/*/*.png"):
        with Image.open(p) as m:
            Image.fromarray(np.zeros_like(np.asarray(m))).save(p)


def _sixteen_bit(root: Path) -> None:
    for p in root.glob("gray/**/*.png"):
        if "ground_truth" not in p.parts:
            _save_png16(p)


def _sound_checkpoint(e: Env, res) -> None:
    """A training that reports success left a loadable, finite checkpoint fit for eval."""
    import torch
    from uadc.config.recipe import load_recipe
    from uadc.data.mvtec import load_image
    from uadc.training.checkpoint import checkpoint_path, load_checkpoint
    r = load_recipe(e.d / "r.yaml")
    model, _ = load_checkpoint(checkpoint_path(r, e.d / "art"), r)
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
    img = load_image(next((e.d / "data" / "gray" / "train" / "good").glob("*.png")), 32)
    assert 0.2 < float(img.mean()) < 0.8, "16-bit image not read as its real gray levels"


def _sound_artifact(path: str):
    def check(e: Env, res) -> None:
        import onnx
        from uadc.core.constants import MODEL_FILE, REPORT_FILE
        from uadc.passes.pipeline import check_finite
        out = e.d / path
        report = json.loads((out / REPORT_FILE).read_text(), parse_constant=_no_nan)
        assert report["verification"]["torch_vs_ort_fp32"]["passed"]
        assert not (out / "old.txt").exists()  # the replaced uadc folder is gone as a whole
        model = onnx.load(str(out / MODEL_FILE))
        feeds = {"image": np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)}
        check_finite(model, feeds, "artifact")
        assert not [p for p in e.d.iterdir() if ".uadc-tmp-" in p.name], "temp left beside the artifact"
    return check


def _names_nan(stderr: str) -> None:
    """The gate after export caught it (NaN outputs, or NaN weights once batch norm is folded)."""
    assert "NaN/Inf" in stderr and ("outputs" in stderr or "weights" in stderr), stderr[-500:]


def _no_nan(c: str):
    raise AssertionError(f"report.json holds a bare {c} (not JSON)")


def _onnx_with_external(e: Env) -> None:
    import onnx
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("float_data")
    w.external_data.add(key="location", value="/etc/passwd")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
    onnx.save(helper.make_model(g), e.d / "ext.onnx")


def _onnx_bad_graph(e: Env) -> None:
    import onnx
    from onnx import TensorProto, helper
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), e.d / "bad.onnx")


def _onnx_bad_scale(e: Env) -> None:
    """Valid ONNX, a Q/DQ pair with a zero scale: check-trt lists it (exit 1), not exit 0."""
    import onnx
    from onnx import TensorProto, helper
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.0])
    z = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [s, z])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), e.d / "q.onnx")


def _huge_sparse(e: Env) -> None:
    with open(e.d / "huge.onnx", "wb") as f:
        f.truncate(3 << 30)  # claims 3 GiB, occupies nothing


def _deep_yaml(e: Env) -> None:
    (e.d / "r.yaml").write_text("data: " + "[" * 1000 + "]" * 1000 + "\n")


def _anchors(e: Env) -> None:
    """A 'billion laughs' recipe: a few hundred bytes that expand to 10^9 leaves."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("data: {sources: [{root: *a8}]}")
    (e.d / "r.yaml").write_text("\n".join(lines) + "\n")


def _huge_recipe(e: Env) -> None:
    (e.d / "r.yaml").write_text("# " + "x" * (2 << 20) + "\n")


def _symlink_out(e: Env) -> None:
    (e.d / "mine").mkdir()
    (e.d / "mine" / "keep.txt").write_text("mine")
    (e.d / "link").symlink_to(e.d / "mine")


def _fake_uadc_out(e: Env) -> None:
    d = e.d / "old_out"
    d.mkdir()
    (d / "report.json").write_text('{"schema": 3, "target": "ort-cpu-fp32", "recipe_hash": "0123456789abcdef"}')
    (d / "old.txt").write_text("from an older compile")
    (d / "artifact.json").write_text('{"schema": 1, "uadc_version": "0.1", "files": {"report.json": "0", "old.txt": "0"}}')


def _copied_report(e: Env) -> None:
    _fake_uadc_out(e)
    (e.d / "old_out" / "artifact.json").unlink()   # a report.json copied among notes: not an artifact folder


def _ckpt_in_recipe_dir(e: Env) -> None:
    d = e.d / "art" / "r"
    d.mkdir(parents=True)
    shutil.copy(e.s.ckpt, d / "checkpoint.pt")


def _image_is_dir(root: Path) -> None:
    good = root / "stripes" / "train" / "good"
    (good / "zz.png").mkdir()
    shutil.copy(sorted(good.glob("*.png"))[0], good / "zz.png" / "a.png")


def _float_image(root: Path) -> None:
    Image.fromarray(np.zeros((32, 32), np.float32)).save(root / "stripes" / "train" / "good" / "000.tiff")


def _flipped_ckpt(e: Env) -> None:
    b = bytearray(e.s.ckpt.read_bytes())
    mid = len(b) // 2   # inside the weights (they are most of the file)
    b[mid:mid + 64] = bytes(x ^ 0xFF for x in b[mid:mid + 64])
    (e.d / "c.pt").write_bytes(bytes(b))


def _truncated_png(root: Path) -> None:
    p = root / "stripes" / "train" / "good" / "000.png"
    p.write_bytes(p.read_bytes()[:60])


def _mask_size(root: Path) -> None:
    p = next((root / "gray" / "ground_truth" / "blob").glob("*.png"))
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(p)


def _no_train_images(root: Path) -> None:
    shutil.rmtree(root / "gray" / "train" / "good")
    (root / "gray" / "train" / "good").mkdir()


def _bomb_image(root: Path) -> None:
    """A 46 KB PNG that claims 20000 x 20000 pixels: over Pillow's decompression-bomb limit."""
    Image.new("1", (20000, 20000)).save(root / "stripes" / "train" / "good" / "000.png")


def _garbage_image(root: Path) -> None:
    (root / "stripes" / "test" / "good" / "000.png").write_bytes(b"\x89PNG not really")


# -- the table -------------------------------------------------------------------------------------
R = "r.yaml"
TRAIN = lambda *a: (lambda e: ["train", R, "--artifacts", "art", *a])        # noqa: E731
COMPILE = lambda *a: (lambda e: ["compile", str(e.s.recipe), "--artifacts", str(e.s.art), *a])  # noqa: E731


def _OWN_COMPILE(*a):   # noqa: N802 - the case folder's r.yaml, with the shared checkpoint
    return lambda e: ["compile", R, "--artifacts", "art", "--checkpoint", str(e.s.ckpt), "--no-eval", "--out", "o", *a]


def _recipe_case(id: str, msg: str, **sections) -> Case:
    return Case(id, TRAIN(), msg=msg, setup=lambda e: recipe(e, **sections))


CASES: list[Case] = [
    # recipes ---------------------------------------------------------------------------------
    Case("recipe-missing", TRAIN(), msg="recipe not found"),
    # its newline became a space in the error line: another file's name
    Case("recipe-missing-newline-in-name", lambda e: ["train", "a\nb.yaml", "--artifacts", "art"],
         msg="recipe not found: a\\x0ab.yaml"),
    Case("sweep-file-newline-in-name", lambda e: ["sweep", "a\nb.yaml", "--sequential"],
         msg="sweep file not found: a\\x0ab.yaml"),
    Case("recipe-is-folder", TRAIN(), msg="a folder, not a YAML file", setup=lambda e: (e.d / R).mkdir()),
    # `demo/` names a folder; click's Path made it `demo`, and the built-in demo trained
    Case("recipe-is-folder-named-like-a-builtin", lambda e: ["train", "demo/", "--artifacts", "art"],
         msg="recipe demo: a folder, not a YAML file", setup=lambda e: (e.d / "demo").mkdir()),
    Case("recipe-binary", TRAIN(), msg="not a text file", setup=text(R, b"\xff\xfe\x00\x81" * 64)),
    Case("recipe-bad-yaml", TRAIN(), msg="not valid YAML", setup=text(R, "data: [unclosed\n  x: {")),
    Case("recipe-section-twice", TRAIN(), msg="not valid YAML: key 'data' appears twice in one mapping (lines 1 and 3)",
         setup=text(R, "data:\n  image_size: 32\ndata:\n  image_size: 64\n")),      # the last one won silently
    Case("recipe-key-twice", TRAIN(), msg="key 'epochs' appears twice in one mapping (lines 2 and 3)",
         setup=text(R, "train:\n  epochs: 1\n  epochs: 2\n")),
    Case("recipe-top-level-list", TRAIN(), msg="expected a mapping", setup=text(R, "- a\n- b\n")),
    Case("recipe-empty", TRAIN(), msg="data: required", setup=text(R, "")),
    # PyYAML's constructors raised ValueError / KeyError / AttributeError: a traceback, exit 1
    Case("recipe-float-tag-on-text", TRAIN(), msg="not valid YAML: cannot read 'abc' as float (ValueError) (line 1, column 7)",
         setup=text(R, "seed: !!float abc\n")),
    Case("recipe-bool-tag-on-text", TRAIN(), msg="not valid YAML: cannot read 'maybe' as bool (KeyError) (line 2",
         setup=text(R, "data:\n  image_size: !!bool maybe\n")),
    Case("recipe-timestamp-tag-on-text", TRAIN(), msg="cannot read 'x' as timestamp (AttributeError)",
         setup=text(R, "name: !!timestamp x\n")),
    Case("recipe-python-tag", TRAIN(), msg="not valid YAML",
         setup=lambda e: (e.d / R).write_text(f"data: !!python/object/apply:os.system ['touch {e.d / MARKER}']\n"),
         check=no_marker),
    Case("recipe-nested-anchors", TRAIN(), msg="data.sources[0].root: expected str", setup=_anchors),
    Case("recipe-deep-nesting", TRAIN(), msg="nested too deeply", setup=_deep_yaml),
    Case("recipe-over-1mib", TRAIN(), msg="recipe larger than", setup=_huge_recipe),
    _recipe_case("recipe-unknown-key", "train.epoch: unknown key", train={"epoch": 3}),
    _recipe_case("recipe-name-dotdot", "name: must be a plain folder name", name="../../x"),
    _recipe_case("recipe-name-absolute", "name: must be a plain folder name", name="/tmp/elsewhere"),
    _recipe_case("recipe-name-hidden", "name: must be a plain folder name", name=".hidden"),
    _recipe_case("recipe-name-backslash", "name: must be a plain folder name", name="a\\..\\b"),
    _recipe_case("recipe-name-empty", "name: must be a plain folder name", name=""),
    _recipe_case("recipe-image-size-huge", "data.image_size: 100000 is above the maximum", data={"image_size": 100000}),
    _recipe_case("recipe-image-size-string", "data.image_size: expected int", data={"image_size": "64"}),
    _recipe_case("recipe-image-size-bool", "data.image_size: expected int", data={"image_size": True}),
    _recipe_case("recipe-seed-2**70", "seed: ", seed=2**70),
    _recipe_case("recipe-seed-negative", "seed: -1 is below the minimum", seed=-1),
    _recipe_case("recipe-lr-inf", "train.lr: expected a finite number", train={"lr": float("inf")}),
    _recipe_case("recipe-lr-nan", "train.lr: expected a finite number", train={"lr": float("nan")}),
    _recipe_case("recipe-epochs-zero", "train.epochs: 0 is below the minimum", train={"epochs": 0}),
    _recipe_case("recipe-batch-huge", "train.batch_size: 1000000000 is above the maximum",
                 train={"batch_size": 10**9}),
    _recipe_case("recipe-calib-samples-huge", "compile.calib_samples: 1000000 is above the maximum",
                 compile={"calib_samples": 10**6}),
    _recipe_case("recipe-taps-empty", "model.taps: must not be empty", model={"taps": []}),
    _recipe_case("recipe-split-on-stfpm", "model.split: applies to method paste, not 'stfpm'",   # ignored before
                 model={"split": "blocks.1"}),
    _recipe_case("recipe-students-on-stfpm", "model.students: applies to method us, not 'stfpm'", model={"students": 5}),
    # US scores with its own head: a fast head or a summed map was accepted and ignored
    _recipe_case("recipe-fast-head-on-us", "model.head: applies to method stfpm or paste or rd, not 'us'",
                 model={"method": "us", "head": "fast"}),
    _recipe_case("recipe-combine-on-us", "model.combine: applies to method stfpm or paste or rd, not 'us'",
                 model={"method": "us", "combine": "sum"}),
    _recipe_case("recipe-tap-unknown", "unknown feature tap 'blocks.99'",        # left art/<name>/ and a lock before
                 model={"taps": ["blocks.2", "blocks.99"]}),
    _recipe_case("recipe-taps-twice", "model: taps lists 'blocks.2' twice",
                 model={"taps": ["blocks.2", "blocks.4", "blocks.2"]}),
    _recipe_case("recipe-method-unknown", "model.method: 'bogus' is not one of", model={"method": "bogus"}),
    _recipe_case("recipe-sources-empty", "data.sources: must not be empty", data={"sources": []}),
    _recipe_case("recipe-categories-empty", "categories: must not be empty",
                 data={"sources": [{"root": "x", "categories": []}]}),
    _recipe_case("recipe-data-root-missing", "data folder not found",
                 data={"sources": [{"root": "nowhere", "categories": ["a"]}]}),
    Case("recipe-category-twice", TRAIN(), msg="appears twice",
         setup=lambda e: recipe(e, data={"sources": [{"root": str(e.s.data), "categories": ["gray"]},
                                                     {"root": str(e.s.data), "categories": ["gray"]}]})),
    Case("recipe-category-missing", TRAIN(), msg="nosuch",
         setup=lambda e: recipe(e, data={"sources": [{"root": str(e.s.data), "categories": ["nosuch"]}]})),
    Case("recipe-data-root-is-file", TRAIN(), msg="data folder not found",
         setup=lambda e: recipe(e, data={"sources": [{"root": str(e.s.recipe), "categories": ["a"]}]})),
    Case("recipe-target-unknown", COMPILE("--no-eval", "--target", "tpu", "--out", "o"), msg="tpu"),
    # data ------------------------------------------------------------------------------------
    Case("data-16bit-and-01-masks", TRAIN("--epochs", "1"), code=0, slow=True, allow=("art",),
         setup=with_data(lambda r: (_sixteen_bit(r), _masks_zero_one(r))), check=_sound_checkpoint),
    Case("data-masks-empty", TRAIN(), msg="marks no pixel", setup=with_data(_masks_empty)),
    Case("data-image-garbage", TRAIN(), msg="unreadable image", setup=with_data(_garbage_image)),
    Case("data-image-truncated", TRAIN(), msg="unreadable image", setup=with_data(_truncated_png)),
    Case("data-image-bomb", TRAIN(), msg="DecompressionBombError", setup=with_data(_bomb_image)),
    # a folder named like an image is a subfolder (README: not read, counted): it was an "unreadable image" every run
    Case("data-image-is-folder", TRAIN("--epochs", "1"), code=0, slow=True, allow=("art",),
         msg="1 image in its subfolders is not read", setup=with_data(_image_is_dir), check=_sound_checkpoint),
    Case("data-image-float32", TRAIN(), msg="mode F", setup=with_data(_float_image)),
    Case("data-mask-size", TRAIN(), msg="mask size", setup=with_data(_mask_size)),
    Case("data-no-train-images", TRAIN(), msg="gray", setup=with_data(_no_train_images)),
    # checkpoints -----------------------------------------------------------------------------
    Case("ckpt-crafted-torch-save", COMPILE("--checkpoint", "evil.pt", "--out", "o"), msg="refused to load",
         setup=crafted_torch, check=no_marker),
    Case("ckpt-crafted-raw-pickle", COMPILE("--checkpoint", "evil.pt", "--out", "o"), msg="evil.pt",
         setup=crafted_pickle, check=no_marker),
    Case("ckpt-crafted-in-real-zip", COMPILE("--checkpoint", "evil.pt", "--out", "o"), msg="refused to load",
         setup=crafted_in_zip, check=no_marker),
    Case("ckpt-crafted-eval", lambda e: ["eval", str(e.s.recipe), "--checkpoint", "evil.pt"],
         msg="refused to load", setup=crafted_torch, check=no_marker),
    Case("ckpt-crafted-other-suffix", COMPILE("--checkpoint", "evil.bin", "--out", "o"), msg="refused to load",
         setup=lambda e: (crafted_torch(e), (e.d / "evil.pt").rename(e.d / "evil.bin")), check=no_marker),
    Case("ckpt-unreadable", COMPILE("--checkpoint", "c.pt", "--out", "o"),   # open() fails: an I/O error (traceback)
         msg="cannot read checkpoint c.pt: Input/output error", setup=lambda e: (e.d / "c.pt").symlink_to("/proc/self/mem")),
    Case("ckpt-empty", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="cannot read checkpoint",
         setup=text("c.pt", b"")),
    Case("ckpt-truncated", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="cannot read checkpoint",
         setup=lambda e: (e.d / "c.pt").write_bytes(e.s.ckpt.read_bytes()[: e.s.ckpt.stat().st_size // 2])),
    # torch.load does not check the zip's CRCs: eval scored the damaged weights and compile shipped them, exit 0
    Case("ckpt-bytes-flipped", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="does not match its checksum",
         setup=_flipped_ckpt),
    Case("ckpt-bytes-flipped-eval", lambda e: ["eval", str(e.s.recipe), "--checkpoint", "c.pt"],
         msg="checkpoint c.pt is damaged: ", setup=_flipped_ckpt),
    Case("ckpt-random-bytes", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="c.pt",
         setup=text("c.pt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))),
    Case("ckpt-is-folder", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="checkpoint c.pt is a folder",
         setup=lambda e: (e.d / "c.pt").mkdir()),                             # "not found" before
    Case("ckpt-a-recipe", COMPILE("--checkpoint", "r.yaml", "--out", "o"),     # "holds objects other than tensors"
         msg="--checkpoint r.yaml: a recipe file, not a checkpoint (checkpoint.pt)",
         setup=text("r.yaml", "data: {}\n")),
    Case("ckpt-eval-not-a-file", lambda e: ["eval", str(e.s.recipe), "--checkpoint", "nope"],
         msg="checkpoint not found: nope"),                                    # evaluated the recipe's own before
    Case("ckpt-missing", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="checkpoint not found"),
    Case("ckpt-no-recipe-key", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="not a uadc checkpoint",
         setup=lambda e: ckpt_blob(e, lambda b: {"state_dict": b["state_dict"]})),
    Case("ckpt-a-list", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="not a uadc checkpoint",
         setup=lambda e: ckpt_blob(e, lambda b: [1, 2, 3])),
    # metadata eval reads beside the weights: a TypeError / KeyError / unserialisable tensor before
    *[Case(f"ckpt-eval-bad-{key}-{i}", lambda e: ["eval", str(e.s.recipe), "--checkpoint", "c.pt"],
           msg=f"its {key} is not what uadc train writes", setup=lambda e, k=key, v=value: ckpt_blob(e, lambda b: {**b, k: v()}))
      for key, values in (("history", (lambda: [1], lambda: None, lambda: [{"test": {}}],
                                       lambda: [{"epoch": 1, "seconds": 1.0, "test": 5}],
                                       lambda: [{"epoch": 1, "seconds": 1.0, "setup_seconds": "2"}])),
                          ("stats", (lambda: {"x": __import__("torch").zeros(3)},)), ("train_seconds", (lambda: "1 s",)))
      for i, value in enumerate(values)],
    Case("ckpt-missing-weights", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="weights do not fit",
         setup=lambda e: ckpt_blob(e, lambda b: {**b, "state_dict": dict(list(b["state_dict"].items())[1:])})),
    Case("ckpt-other-settings", COMPILE("--checkpoint", "c.pt", "--out", "o"),      # the setting that differs, named
         msg="tiny.yaml (data.image_size: 64 in the checkpoint, 32 in the recipe); retrain",
         setup=lambda e: ckpt_blob(e, lambda b: {**b, "recipe": {**b["recipe"],
                                                                 "data": {**b["recipe"]["data"], "image_size": 64}}})),
    # the seed draws the validation split: another seed's checkpoint trained on this recipe's validation normals
    Case("ckpt-other-seed", COMPILE("--checkpoint", "c.pt", "--out", "o"),
         msg="has seed 0: the seed draws the validation normals held out of training",
         setup=lambda e: ckpt_blob(e, lambda b: {**b, "recipe": {**b["recipe"], "seed": 7}})),
    Case("ckpt-stored-recipe-escapes", COMPILE("--checkpoint", "c.pt", "--out", "o"), msg="stored recipe is invalid",
         setup=lambda e: ckpt_blob(e, lambda b: {**b, "recipe": {**b["recipe"], "name": "../../x"}})),
    Case("ckpt-nan-eval", lambda e: ["eval", str(e.s.recipe), "--checkpoint", str(e.s.nan_ckpt)],
         msg="NaN/Inf in the weights"),
    *[Case(f"ckpt-nan-{t}{'-no-eval' if ne else ''}",
           (lambda t, ne: lambda e: ["compile", str(e.s.recipe), "--artifacts", "art", "--target", t, "--checkpoint",
                                     str(e.s.nan_ckpt), *(["--no-eval"] if ne else [])])(t, ne),
           msg="NaN/Inf in the weights: student.")
      for t in TARGETS for ne in (False, True)],
    Case("ckpt-inf-compile", lambda e: ["compile", str(e.s.recipe), "--artifacts", "art", "--checkpoint",
                                        str(e.s.inf_ckpt)], msg="NaN/Inf in the weights: student."),
    Case("ckpt-outputs-overflow", lambda e: ["compile", str(e.s.recipe), "--artifacts", "art", "--checkpoint",
                                             str(e.s.huge_ckpt), "--no-eval"],
         msg="export: ", slow=True, check=lambda e, res: _names_nan(res.stderr)),
    # an empty --target (an unset shell variable) compiled the recipe's target, exit 0
    Case("target-empty", COMPILE("--target", "", "--no-eval", "--out", "o"), msg="expected a target's name"),
    Case("target-empty-qat", lambda e: ["qat", str(e.s.recipe), "--artifacts", str(e.s.art), "--target", "",
                                        "--no-compile"], msg="unknown target ''"),
    # a pass list that cannot make its target: without qdq an FP32 model shipped as int8 (exit 0), [] was ignored
    Case("passes-int8-without-qdq", _OWN_COMPILE(), msg="compile.passes ['cleanup']: target ort-cpu-int8 needs qdq",
         setup=lambda e: recipe(e, compile={"passes": ["cleanup"]})),
    Case("passes-empty", _OWN_COMPILE(), msg="compile.passes []: target ort-cpu-int8 needs qdq",
         setup=lambda e: recipe(e, compile={"passes": []})),
    Case("passes-fp32-with-qdq", _OWN_COMPILE("--target", "ort-cpu-fp32"),
         msg="target ort-cpu-fp32 does not take qdq", setup=lambda e: recipe(e, compile={"passes": ["qdq", "cleanup"]})),
    # qdq twice: ORT quantized a quantized model into a Q/DQ cycle, and the partition walk looped for ever
    Case("passes-qdq-twice", _OWN_COMPILE(), msg="qdq is listed 2 times; it runs once",
         setup=lambda e: recipe(e, compile={"passes": ["partition_check", "qdq", "qdq", "cleanup"]})),
    # outputs ---------------------------------------------------------------------------------
    Case("out-user-folder", COMPILE("--no-eval", "--out", "mine"), msg="was not written by uadc",
         setup=mkdir_files("mine", {"thesis.tex": "years of work"})),
    Case("out-user-folder-force", COMPILE("--no-eval", "--out", "mine", "--force"), msg="was not written by uadc",
         setup=mkdir_files("mine", {"thesis.tex": "years of work"})),
    Case("out-regular-file", COMPILE("--no-eval", "--out", "f.txt", "--force"), msg="not a folder",
         setup=text("f.txt", "keep me")),
    Case("out-dot", COMPILE("--no-eval", "--out", ".", "--force"), msg="was not written by uadc",
         setup=text("keep.txt", "keep me")),
    Case("out-symlink", COMPILE("--no-eval", "--out", "link", "--force"), msg="output path is a symbolic link",
         setup=_symlink_out),
    Case("out-recipe-artifact-dir", lambda e: ["compile", R, "--artifacts", "art", "--no-eval", "--out", "art/r",
                                               "--force"],
         msg="was not written by uadc", setup=both(lambda e: recipe(e), _ckpt_in_recipe_dir)),
    Case("out-under-a-file", COMPILE("--no-eval", "--out", "f.txt/sub"), msg="not a folder", setup=text("f.txt", "x")),
    # an artifact in train/good: the next run read it as data (named x.png: "unreadable image", every run)
    Case("out-inside-the-data", lambda e: COMPILE("--no-eval", "--out", str(e.s.data / "gray" / "train" / "good" / "x.png"))(e),
         msg="inside the recipe's data folder"),
    Case("out-read-only", COMPILE("--no-eval", "--out", "ro/out"), msg="not writable", setup=readonly("ro")),
    Case("dump-passes-is-file", COMPILE("--no-eval", "--out", "o", "--dump-passes", "f.txt"), msg="not a folder",
         setup=text("f.txt", "keep")),
    # a user's file of a dump's name was overwritten, and an earlier dump's files mixed in with this one's
    Case("dump-passes-into-a-users-folder", COMPILE("--no-eval", "--out", "o", "--dump-passes", "mine"),
         msg="--dump-passes mine: a folder holding notes.txt, not an earlier dump",
         setup=both(lambda e: (e.d / "mine").mkdir(), text("mine/notes.txt", "keep"), text("mine/02_qdq.onnx", "mine"))),
    # a folder of the user's models named like dumps (and no marker): every one was deleted
    Case("dump-passes-into-a-folder-of-models", COMPILE("--no-eval", "--out", "o", "--dump-passes", "mine"),
         msg="--dump-passes mine: a folder holding 00_base.onnx, not an earlier dump (no passes.json of uadc)",
         setup=both(lambda e: (e.d / "mine").mkdir(), text("mine/00_base.onnx", "m"), text("mine/01_resnet.onnx", "m"))),
    # a file where precision auto keeps its profiles: "not a folder: .../timing_cache", after the export
    Case("timing-cache-is-a-file", COMPILE("--no-eval", "--out", "o", "--target", "ort-cpu-int8", "--precision", "auto"),
         msg="precision auto keeps its ONNX Runtime profiles there", setup=text("timing_cache", "x")),
    # `uadc qat`'s folder (qat.json counts as uadc's) was replaced with a compile artifact under --force
    Case("out-is-a-qat-folder", COMPILE("--no-eval", "--out", "q", "--force"), msg="the folder of a QAT model",
         setup=both(lambda e: (e.d / "q").mkdir(), text("q/qat.json", '{"recipe_hash": "r", "model_hash": "m", '
                                                                     '"target": "ort-cpu-int8"}'),
                    text("q/qat_model.onnx", "x"))),
    # the whole compile ran, then "exists and was not written by uadc (nothing was changed)": it had dumped there
    *[Case(f"dump-passes-overlaps-out-{i}", COMPILE("--no-eval", "--out", out, "--dump-passes", dump), msg="overlap")
      for i, (out, dump) in enumerate((("o", "o"), ("o", "o/passes"), ("d/o", "d")))],
    Case("artifacts-is-file", TRAIN(), msg="art", setup=both(lambda e: recipe(e), text("art", "a file"))),
    Case("artifacts-read-only", TRAIN(), msg="not writable", setup=both(lambda e: recipe(e), readonly("art"))),
    Case("out-force-replaces-uadc-folder", COMPILE("--target", "ort-cpu-fp32", "--no-eval", "--out", "old_out",
                                                   "--force"),
         code=0, msg="artifact written", setup=_fake_uadc_out, allow=("old_out", ".old_out.lock"), slow=True,
         check=_sound_artifact("old_out")),
    # a folder of notes holding a copy of a report.json was uadc's: replaced whole, the notes with it
    Case("out-force-a-folder-with-a-copied-report", COMPILE("--target", "ort-cpu-fp32", "--no-eval", "--out", "old_out",
                                                            "--force"),
         msg="holds a uadc report but no artifact.json of uadc's: not an output uadc replaces", setup=_copied_report),
    # options ---------------------------------------------------------------------------------
    Case("opt-quantize-comma", COMPILE("--no-eval", "--quantize", ",", "--out", "o"), msg="empty items"),
    Case("opt-quantize-unknown", COMPILE("--no-eval", "--quantize", "everything", "--out", "o"), msg="everything"),
    Case("opt-calib-samples-huge", COMPILE("--calib-samples", "1000000"), usage=True),
    Case("opt-calib-samples-zero", COMPILE("--calib-samples", "0"), usage=True),
    Case("opt-epochs-zero", TRAIN("--epochs", "0"), usage=True, setup=lambda e: recipe(e)),
    Case("opt-unknown-option", COMPILE("--frobnicate"), usage=True),
    Case("opt-calibrator-unknown", COMPILE("--no-eval", "--target", "ort-cpu-int8", "--calibrator", "bogus",
                                           "--out", "o"), msg="unknown calibrator"),
    Case("opt-calibrator-on-fp32", COMPILE("--no-eval", "--target", "ort-cpu-fp32", "--calibrator", "entropy",
                                           "--out", "o"), msg="quantization options do not apply: --calibrator / calibrator"),
    Case("opt-quantize-on-fp32", COMPILE("--no-eval", "--target", "ort-cpu-fp32", "--quantize", "student,teacher",
                                         "--per-tensor", "--out", "o"),     # silently ignored before
         msg="ort-cpu-fp32 is fp32, so quantization options do not apply: --quantize / quantize; "
             "--per-channel, --per-tensor / per_channel"),
    Case("opt-from-qat-on-fp32", COMPILE("--no-eval", "--target", "ort-cpu-fp32", "--from-qat", "--out", "o"),
         msg="QAT needs an int8 target"),
    Case("opt-quantize-twice", COMPILE("--no-eval", "--target", "ort-cpu-int8", "--quantize", "student,student",
                                       "--out", "o"), msg="'student,student' lists 'student' twice"),
    Case("opt-build-engine-on-ort", COMPILE("--no-eval", "--target", "ort-cpu-int8", "--build-engine", "--out", "o"),
         msg="--build-engine builds a TensorRT engine; target ort-cpu-int8 runs on onnxruntime"),
    Case("opt-from-qat-missing", COMPILE("--no-eval", "--target", "ort-cpu-int8", "--from-qat", "--out", "o"),
         msg="qat"),
    Case("eval-no-checkpoint", lambda e: ["eval", R, "--artifacts", "art"], msg="checkpoint not found",
         setup=lambda e: recipe(e)),
    # check-trt / ONNX ------------------------------------------------------------------------
    Case("onnx-missing", lambda e: ["check-trt", "m.onnx"], msg="model not found"),
    Case("onnx-empty", lambda e: ["check-trt", "m.onnx"], msg="empty file", setup=text("m.onnx", b"")),
    Case("onnx-truncated", lambda e: ["check-trt", "m.onnx"], msg="m.onnx",
         setup=lambda e: (e.d / "m.onnx").write_bytes(onnx_bytes(e)[: len(onnx_bytes(e)) // 2])),
    Case("onnx-random-bytes", lambda e: ["check-trt", "m.onnx"], msg="not an ONNX model",
         setup=text("m.onnx", bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8)))),
    Case("onnx-text", lambda e: ["check-trt", "m.onnx"], msg="m.onnx", setup=text("m.onnx", "hello world\n")),
    Case("onnx-folder", lambda e: ["check-trt", "m.onnx"], msg="m.onnx: a folder without model.onnx; give an ONNX file or an artifact folder",
         setup=lambda e: (e.d / "m.onnx").mkdir()),
    Case("onnx-huge-claimed", lambda e: ["check-trt", "huge.onnx"], msg="over the 2 GiB", setup=_huge_sparse),
    Case("onnx-external-data-path", lambda e: ["check-trt", "ext.onnx"], msg="ext.onnx", setup=_onnx_with_external),
    Case("onnx-unknown-op", lambda e: ["check-trt", "bad.onnx"], msg="invalid ONNX model", setup=_onnx_bad_graph),
    Case("onnx-zero-scale", lambda e: ["check-trt", "q.onnx"], code=1, msg="QDQ004", setup=_onnx_bad_scale),
    Case("onnx-valid", lambda e: ["check-trt", str(e.s.onnx)], code=0, msg="0 violations"),
]
