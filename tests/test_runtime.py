"""uadc.runtime: torch-free, preprocessing identical to the training loader, same scores as the
in-process evaluation, and ``uadc predict`` over folders."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uadc.core.errors import UadcError
from uadc.core.manifest import Preprocessing
from uadc.data.mvtec import ImageDataset, Sample
from uadc.runtime.preprocess import preprocess

from conftest import edited_artifact as _edited_artifact

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Blocks ``import torch`` (and torchvision) for the whole interpreter, as on an edge box without it.
BLOCKER = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is not installed on this box")
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def _loader_tensor(path: Path, size: int, mean, std) -> np.ndarray:
    return ImageDataset([Sample(path, "c", "good")], size, mean, std)[0]["image"].numpy()


@pytest.mark.parametrize("mode,shape", [("RGB", (50, 50)), ("L", (50, 50)), ("RGB", (37, 61)), ("L", (64, 40)),
                                        ("RGBA", (64, 64)), ("RGB", (64, 64))])
def test_preprocessing_equals_the_training_loader(tmp_path, mode, shape):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": None, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, shape + ((channels,) if channels else ()), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr, mode).save(path)
    for mean, std in [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]:
        pre = Preprocessing(64, mean, std)
        ref = _loader_tensor(path, 64, mean, std)
        for source in (path, str(path), Image.open(path), arr):
            got = preprocess(source, pre)
            assert got.shape == (3, 64, 64) and got.dtype == np.float32
            assert np.abs(got - ref).max() <= 1e-6


def test_a_palette_image_with_transparency_reads_without_pillow_warning(tmp_path):
    """Pillow warned on stderr ("Palette images with Transparency expressed in bytes should be
    converted to RGBA images") when the loader or `uadc predict` read one; same pixels now, no warning."""
    import warnings
    rng = np.random.default_rng(0)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").convert("P").save(path)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, ref = preprocess(path, pre), _loader_tensor(path, 32, (0.5,) * 3, (0.5,) * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR), np.float32) / 255
    assert np.abs(got - ref).max() <= 1e-6 and np.abs(got - (direct.transpose(2, 0, 1) - 0.5) / 0.5).max() <= 1e-5


def test_16_bit_images_equal_the_training_loader_and_float_ones_are_refused_alike(tmp_path):
    """A 16-bit grayscale PNG (line cameras write them) becomes the loader's tensor, not Pillow's
    saturated white; 32-bit float pixels are one UadcError in both."""
    from uadc.data.mvtec import load_image
    arr = np.random.default_rng(3).integers(0, 65536, (48, 56), dtype=np.uint16)
    path = tmp_path / "x16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    pre = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)
    ref = _loader_tensor(path, 64, pre.mean, pre.std)
    assert ref.std() > 0.2                                   # not saturated
    for source in (path, Image.open(path)):
        assert np.abs(preprocess(source, pre) - ref).max() <= 1e-6
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    for read in (lambda: load_image(tmp_path / "f.tif", 64), lambda: preprocess(tmp_path / "f.tif", pre)):
        with pytest.raises(UadcError, match="mode F"):
            read()
    with pytest.raises(UadcError, match=r"^unsupported image \(a PIL image\): 32-bit float"):   # was 'image image'
        preprocess(Image.open(tmp_path / "f.tif"), pre)
    # premultiplied gray + alpha (an in-memory image): Pillow's raw "conversion from La to L not supported"
    la = Image.fromarray(np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), 255, np.uint8)], -1), "LA")
    assert np.array_equal(preprocess(la.convert("La"), pre), preprocess(la, pre))


def test_dim_high_bit_images_and_animations_are_noted_once_per_folder(tmp_path, caplog):
    """12-bit camera data in 16-bit PNGs read nearly black, and a multi-page TIFF (an animated GIF, before GIFs
    were refused) was scored on its first page, both without a word."""
    import logging
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    for i in range(2):
        Image.fromarray(np.linspace(0, 4095, 1024).reshape(32, 32).astype(np.uint16)).save(tmp_path / f"c{i}.png")
    full = tmp_path / "full"
    full.mkdir()
    Image.fromarray(np.linspace(0, 65535, 1024).reshape(32, 32).astype(np.uint16)).save(full / "f.png")
    frames = [Image.new("RGB", (32, 32), (v, v, v)) for v in (10, 200)]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, "uadc"):
        for name in ("c0.png", "c1.png", "full/f.png", "pages.tif"):
            preprocess(tmp_path / name, pre)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said   # c1.png is in c0.png's folder; full/f.png uses the whole range
    assert "c0.png: I;16 pixels only up to 4095 of 65535" in said[0] and "12-bit" in said[0]
    assert "pages.tif: several frames" in said[1] and "reads the first" in said[1]
    sub = tmp_path / "sub"
    sub.mkdir()
    frames[0].save(sub / "x\nerror: fake.tif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, "uadc"):
        preprocess(sub / "x\nerror: fake.tif", pre)
    assert caplog.records[-1].getMessage().startswith(f"{sub}/x\\x0aerror: fake.tif: several frames")


def test_predict_lines_cannot_be_faked_by_file_names_or_split_by_library_warnings(int8_artifact, tmp_path):
    """A file named `bad\\nerror: fake.png` printed a line of its own starting `error:`; Pillow's
    warning on a damaged EXIF block reached stderr raw, on two lines."""
    _, _, res = int8_artifact
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad\nerror: fake.png").write_bytes(b"junk")
    exif = Image.Exif()
    exif[0x010E] = "a description long enough to cut"
    Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / "exif.jpg", exif=exif.tobytes()[:-6])
    p = subprocess.run([PY, "-m", "uadc.cli", "predict", str(res.path), str(folder), "--out", str(tmp_path / "o"),
                        "--category", "stripes"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert not [x for x in lines if x.startswith("error:")], lines
    shown = f"{folder}/bad\\x0aerror: fake.png"   # the same name in the reason (it read `bad error: fake.png`)
    assert [x for x in lines if x.startswith("skipped ")][0].startswith(f"skipped {shown}: unreadable image {shown}: ")
    assert "warning: Truncated File Read" in lines and "Warning:" not in p.stderr, lines
    gone = subprocess.run([PY, "-m", "uadc.cli", "predict", str(res.path), str(folder / "no\nsuch.png")],
                          capture_output=True, text=True, cwd=ROOT)
    assert gone.returncode == 2 and gone.stderr.startswith(f"error: input not found: {folder}/no\\x0asuch.png"), gone.stderr


def test_importing_the_runtime_loads_no_torch():
    code = "import sys, uadc, uadc.runtime; print(sorted(m for m in ('torch', 'onnx', 'pydantic', 'scipy') " \
           "if m in sys.modules)); uadc.Detector"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def _eval_outputs(recipe, model: Path, category: str):
    """In-process evaluation's raw outputs on a category's test set (uadc.evaluation.run)."""
    from uadc.backends.ort import make_session, ort_predictor
    from uadc.config.recipe import load_recipe
    from uadc.data.prepare import prepare_data
    from uadc.evaluation.run import load_test_arrays, predict
    ds = prepare_data(load_recipe(recipe)).tests[category]
    maps, scores = predict(ort_predictor(make_session(model, 1)), load_test_arrays(ds)[0], 8)
    return [str(s.path) for s in ds.samples], maps, scores


def test_runtime_without_torch_matches_in_process_evaluation(int8_artifact, tmp_path):
    recipe, _, res = int8_artifact
    paths, maps, scores = _eval_outputs(recipe, res.path / "model.onnx", "gray")
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    script = textwrap.dedent(f"""
        import json, sys
        try:
            import torch
            raise SystemExit("torch imported")
        except ImportError:
            pass
        from uadc.runtime import Detector
        det = Detector.load({str(res.path)!r})
        preds = det.predict({paths!r}, category="gray")
        import uadc
        uadc.bundle({str(res.path)!r}, {str(tmp_path / "bundle")!r})   # the CLI's was torch-free, the API's not
        sys.modules["torch"] = None   # as an install without torch fails its import (the blocker's frame aside)
        try:   # what the runtime's install lacks is one UadcError naming it (a ModuleNotFoundError traceback)
            uadc.train
            said = None
        except uadc.UadcError as exc:
            said = str(exc) if isinstance(exc, ImportError) else "not an ImportError"   # a caller's guard catches it
        import pydoc   # help(uadc) read every listed name, and stopped at train's error
        doc = pydoc.render_doc(uadc, renderer=pydoc.plaintext)
        listed = {{n: n in dir(uadc) for n in ("Detector", "bundle", "train")}}
        json.dump({{"scores": [p.score for p in preds], "labels": [p.label for p in preds],
                   "maps": [p.anomaly_map.tolist() for p in preds], "said": said,
                   "torch": sys.modules.get("torch") is not None, "listed": listed,
                   "doc": "class Detector" in doc}}, sys.stdout)
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    p = subprocess.run([PY, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert not out["torch"] and (tmp_path / "bundle" / "artifact.json").is_file()
    assert out["said"].startswith("the torch module does not import here (ModuleNotFoundError: import of torch"), out
    assert out["listed"] == {"Detector": True, "bundle": True, "train": False} and out["doc"], out
    np.testing.assert_allclose(out["scores"], scores, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["maps"]), maps, atol=1e-5)
    from uadc.runtime import Detector
    thr = Detector.load(res.path).thresholds("gray").image.value
    assert out["labels"] == [int(s >= thr) for s in scores]


def test_predict_on_a_runtime_only_install_says_its_warnings(int8_artifact, tiny_data, tmp_path):
    """Without tqdm (an edge box's runtime-only install) every warning was `error: the tqdm module does not
    import here` (exit 2, no tables): the CLI's log handler imported it for each line."""
    _, _, res = int8_artifact
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.replace('("torch", "torchvision")', '("torch", "torchvision", "tqdm")'))
    shutil.copytree(tiny_data / "gray" / "test" / "blob", tmp_path / "cam1")   # no category's name: a warning
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    p = subprocess.run([PY, "-m", "uadc", "predict", str(res.path), "cam1", "--out", "P"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: " in p.stderr and "judged at the global thresholds" in p.stderr
    assert (tmp_path / "P" / "predictions.jsonl").is_file()


def test_a_command_beyond_a_runtime_only_install_says_it_needs_the_full_install(tmp_path):
    """`uadc train` on an edge box's runtime-only install named pydantic, its first import, and advised
    "install uadc's dependencies again": the command needs torch and the compile stack."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules.update(torch=None, torchvision=None, "
                                               "pydantic=None)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    p = subprocess.run([PY, "-m", "uadc", "train", "demo"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: the pydantic module does not import here"), p.stderr
    assert p.stderr.rstrip().endswith("this needs it: the full install (pip install uadc: torch and the compile "
                                      "stack); a runtime-only install runs `uadc predict`, `uadc bundle` and "
                                      "`Detector`"), p.stderr
    assert not (tmp_path / "artifacts").exists()


def test_verify_on_a_runtime_only_install_replaces_the_last_report(tmp_path):
    """`uadc verify A --json v.json` there stopped before its report writers (they imported pydantic): the
    last run's PASS stayed in v.json, and `--json -` printed nothing."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules.update(torch=None, torchvision=None, "
                                               "pydantic=None)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    (tmp_path / "A").mkdir()
    (tmp_path / "v.json").write_text('{"schema": 1, "kind": "verify", "passed": true}')
    for cmd, out in ((["verify", "A", "--json", "v.json"], None), (["verify", "A", "--json", "-"], "stdout"),
                     (["diff", "A", "A", "--json", "-"], "stdout")):
        p = subprocess.run([PY, "-m", "uadc", *cmd], capture_output=True, text=True, env=env, cwd=tmp_path)
        doc = json.loads(p.stdout if out else (tmp_path / "v.json").read_text())
        assert p.returncode == 2 and doc["passed"] is False and doc["exit_code"] == 2, (p.stdout, p.stderr)
        assert "pydantic" in doc["error"] and doc["kind"] == cmd[0]


def test_a_hard_linked_copy_of_an_image_runs_once(tmp_path):
    """A camera folder and its `cp -al` backup given together: each image ran twice (resolved paths differ)."""
    from uadc.core.images import find_images
    (tmp_path / "cam").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cam" / "a.png")
    os.link(tmp_path / "cam" / "a.png", tmp_path / "b.png")
    found = find_images([tmp_path / "cam", tmp_path / "b.png"])
    assert found.files == [tmp_path / "cam" / "a.png"] and dict(found.skipped) == {"given twice": 1}


def test_folder_walks_name_the_images_they_do_not_read(tmp_path):
    """.webp / .gif files in a folder were dropped without a word ("no images found in W")."""
    from uadc.core.images import find_images
    (tmp_path / "W" / "sub").mkdir(parents=True)
    for name in ("W/a.webp", "W/sub/b.gif", "W/c.png", "W/.hidden/d.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    found = find_images(tmp_path / "W")
    assert found.files == [tmp_path / "W" / "c.png"]
    assert list(found.skipped) == ["not read (.webp; uadc reads .png .jpg .jpeg .jpe .jfif .bmp .tif .tiff)",   # hidden: not
                                   "not read (.gif; uadc reads .png .jpg .jpeg .jpe .jfif .bmp .tif .tiff)"]
    again = find_images([tmp_path / "W", tmp_path / "W", tmp_path / "W" / "sub"]).skipped   # each file once
    assert {k: v for k, v in again.items() if k.startswith("not read")} == {k: 1 for k in found.skipped}
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UadcError, match="input is a broken link or a link loop: "):
        find_images(tmp_path / "loop")


def test_a_file_name_of_the_longest_legal_length_is_written(tmp_path):
    """A 255-byte name plus the temp's tag went over the limit: `predict --overlays` lost the whole run."""
    from uadc.core import io as uio
    name = "é" * 125 + "b.png"     # 255 bytes in UTF-8: the temp's cut must not split a character's bytes wrongly
    with uio.staged_files(tmp_path / "overlays") as stage:
        uio.atomic_write_bytes(stage / "L" / name, b"1")
    assert (tmp_path / "overlays" / "L" / name).read_bytes() == b"1"
    assert [p.name for p in (tmp_path / "overlays" / "L").iterdir()] == [name]
    with uio.atomic_dir(tmp_path / ("é" * 127)) as tmp:     # its lock file's name, beside it, went over too
        (tmp / "x").write_text("1")
    assert (tmp_path / ("é" * 127) / "x").read_text() == "1"


def test_predict_cli_writes_predictions_and_overlays(int8_artifact, tmp_path, tiny_data):
    recipe, _, res = int8_artifact
    paths, _, scores = _eval_outputs(recipe, res.path / "model.onnx", "stripes")
    test = tiny_data / "stripes" / "test"
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    p = subprocess.run([PY, "-m", "uadc.cli", "predict", str(res.path), str(test), str(broken.parent), "--out",
                        str(out), "--overlays", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1, p.stderr                     # the unreadable image is reported, the rest ran
    assert f"skipped {broken}" in p.stderr
    summary = json.loads(p.stdout)
    assert summary["images"] == len(paths) and summary["failed"] == 1 and summary["backend"] == "onnxruntime"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_path = {r["path"]: r for r in rows if "score" in r}
    assert [r for r in rows if "error" in r][0]["path"] == str(broken)
    np.testing.assert_allclose([by_path[q]["score"] for q in paths], scores, atol=1e-5)
    assert {r["category"] for r in by_path.values()} == {"stripes"}      # from the folder name
    csv_rows = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))
    assert len(csv_rows) == len(paths) + 1                 # the unreadable one too (only in the JSONL before)
    assert [(r["path"], r["verdict"]) for r in csv_rows if r["error"]] == [(str(broken), "error")]
    overlays = sorted((out / "overlays").rglob("*.png"))
    assert len(overlays) == len(paths) and Image.open(overlays[0]).size == (64, 64)
    # a user error with --json is a JSON document too, as for train / eval / compile (stdout was empty)
    p = subprocess.run([PY, "-m", "uadc.cli", "predict", str(tmp_path / "nope"), str(test), "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and json.loads(p.stdout)["exit_code"] == 2 and "nope" in json.loads(p.stdout)["error"]
    # --overlays where no image could be read: the tables only are named ("overlays/" was, though none existed)
    p = subprocess.run([PY, "-m", "uadc.cli", "predict", str(res.path), str(broken), "--out", str(tmp_path / "o2"),
                        "--overlays"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and "overlays" not in p.stdout and not (tmp_path / "o2" / "overlays").exists(), p.stdout


def test_an_image_over_pillows_warning_limit_predicts_without_its_warning(int8_artifact, tmp_path):
    """A 92-megapixel image (1-2x Pillow's pixel limit: read, resized) printed Pillow's
    DecompressionBombWarning on stderr; uadc's lines only now."""
    big = tmp_path / "in" / "big.png"
    big.parent.mkdir()
    Image.new("L", (9600, 9600), 128).save(big)
    p = subprocess.run([PY, "-m", "uadc.cli", "predict", str(int8_artifact[2].path), str(big.parent), "--out",
                        str(tmp_path / "out"), "--category", "gray"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "DecompressionBomb" not in p.stderr and p.stdout.startswith("1 image "), p.stderr
    import warnings
    from uadc.runtime import Detector
    with warnings.catch_warnings(record=True) as seen:     # the library, in a caller's process, is quiet too
        warnings.simplefilter("always")
        Detector.load(int8_artifact[2].path).predict(big, category="gray")
    assert not [w for w in seen if "DecompressionBomb" in w.category.__name__]


def test_folder_walks_leave_out_masks_and_earlier_predictions(int8_artifact, tmp_path, tiny_data, monkeypatch):
    """Pointing predict at an MVTec category folder scores its images, not its ground_truth masks;
    a later run over a folder that holds an earlier run's output (overlays are PNGs) does not score
    that output; a folder given explicitly is always walked."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    from uadc.core.images import find_images
    det = Detector.load(int8_artifact[2].path)
    cat = tmp_path / "gray"
    shutil.copytree(tiny_data / "gray", cat)
    masks = list((cat / "ground_truth").rglob("*.png"))
    images = [f for f in cat.rglob("*.png") if f not in masks]
    assert masks and images
    first = predict_paths(det, [cat], out=cat / "run1", overlays=True)
    assert len(first.records) == len(images) and first.left_out == {"masks under ground_truth/": len(masks)}
    again = predict_paths(det, [cat], out=tmp_path / "run2", overlays=True)
    assert len(again.records) == len(images)
    assert again.left_out == {"masks under ground_truth/": len(masks), "in a uadc predict output folder": len(images)}
    assert "left out: " in again.summary_line() and again.summary()["left_out"] == again.left_out
    assert len(find_images([cat / "ground_truth"]).files) == len(masks)            # given explicitly
    assert len(find_images([cat / "run1" / "overlays"]).files) == len(images)
    # the output folder is the input folder: each run scores the images, never the overlays it wrote there
    flat = tmp_path / "flat"
    shutil.copytree(cat / "test" / "good", flat)
    n = len(list(flat.iterdir()))
    for left_out in ({}, {"in a uadc predict output folder": n}):
        run = predict_paths(det, [flat], out=flat, overlays=True)
        assert len(run.records) == n and run.left_out == left_out, run.left_out
    # two input folders of one name (each category's test/good) and a file given twice: every
    # prediction keeps its own overlay, named in its record
    goods = [tiny_data / c / "test" / "good" for c in ("stripes", "gray")]
    twice = sorted(goods[0].iterdir())[0]
    run = predict_paths(det, [*goods, twice], out=tmp_path / "run3", overlays=True)
    n = sum(len(list(g.iterdir())) for g in goods)
    assert len(run.records) == n and run.left_out == {"given twice": 1}
    named = [r["overlay"] for r in run.records]
    assert len(set(named)) == n and {Path(o).parts[1] for o in named} == {"good", "good-2"}
    assert all((tmp_path / "run3" / o).is_file() for o in named)
    assert run.warnings == []                                  # every folder path names a category
    cam = tmp_path / "cam1"                                    # a camera's folder: no category in its path
    shutil.copytree(goods[1], cam)
    blind = predict_paths(det, [cam])
    n = len(blind.records)
    assert len(blind.warnings) == 1 and blind.warnings[0].startswith(f"{n} of {n} images")
    assert "--category" in blind.warnings[0] and blind.summary()["warnings"] == blind.warnings
    assert predict_paths(det, [cam], category="gray").warnings == []
    # a folder named like a spreadsheet formula: inert in the CSV, exact in the JSONL
    monkeypatch.chdir(tmp_path)
    shutil.copytree(goods[1], tmp_path / "=HYPERLINK(x)")
    predict_paths(det, [Path("=HYPERLINK(x)")], category="gray", out=Path("run4"))
    csv_rows = (tmp_path / "run4" / "predictions.csv").read_text().splitlines()[1:]
    assert csv_rows and all(r.startswith("'=HYPERLINK(x)/") for r in csv_rows)
    first = json.loads((tmp_path / "run4" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["path"].startswith("=HYPERLINK(x)/")
    # --out holding someone else's predictions.csv / .jsonl: refused before any work, nothing changed
    # ... also a user's table that starts as ours does (a JSONL of paths, a CSV of path,category,score)
    for name, text in (("predictions.csv", "id,score\n1,2\n"), ("predictions.jsonl", "not json\n"),
                       ("predictions.jsonl", '{"path": "x"}\n'), ("predictions.jsonl", '"path notes"\n'),
                       ("predictions.csv", "path,category,score\nx,y,1\n")):
        theirs = tmp_path / f"theirs-{name}-{len(text)}"
        theirs.mkdir()
        (theirs / name).write_text(text)
        with pytest.raises(UadcError, match="was not written by uadc predict"):
            predict_paths(det, [cam], category="gray", out=theirs)
        assert [f.name for f in theirs.iterdir()] == [name] and (theirs / name).read_text() == text
    again = predict_paths(det, [cam], category="gray", out=Path("run4"))      # its own earlier output: replaced
    assert len(again.records) == n


def test_eval_of_a_compiled_artifact_names_it_and_writes_nothing(int8_artifact):
    """`uadc eval R --checkpoint ARTIFACT` titled its table `(unified, None epochs)` and ended `written: None`."""
    from click.testing import CliRunner
    from uadc.cli import main
    recipe, art, res = int8_artifact
    eval_json = art / "tiny" / "eval.json"
    before = eval_json.read_bytes() if eval_json.exists() else None
    out = CliRunner().invoke(main, ["eval", str(recipe), "--artifacts", str(art), "--checkpoint", str(res.path)])
    assert out.exit_code == 0, out.output
    assert f"tiny (unified, {res.path})" in out.output and "None" not in out.output
    assert out.stdout.rstrip().endswith("not written: eval.json holds the recipe's own unified checkpoint's figures")
    assert (eval_json.read_bytes() if eval_json.exists() else None) == before


def test_a_new_run_into_an_out_folder_removes_the_overlays_of_the_tables_it_replaces(int8_artifact, tiny_data,
                                                                                      tmp_path):
    """Overlays of the earlier run stayed beside the new tables: two runs mixed in overlays/."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    out, test = tmp_path / "p", tiny_data / "gray" / "test"
    first = predict_paths(det, [test], out=out, overlays=True)
    (out / "overlays" / "mine.png").write_bytes(b"not uadc's")          # the user's file stays
    second = predict_paths(det, [test / "good"], out=out, overlays=True)
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.png"))
    assert len(second.records) < len(first.records)
    assert pngs == sorted([r["overlay"] for r in second.records] + ["overlays/mine.png"])
    predict_paths(det, [test / "good"], out=out)                          # no overlays this time
    assert [p.name for p in (out / "overlays").rglob("*.png")] == ["mine.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["mine.png"]   # emptied folders gone too
    # a file where an overlay would go that the tables do not name is the user's: refused, not overwritten
    theirs = out / second.records[0]["overlay"]
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"the user's notes")
    tables = {f: (out / f).read_bytes() for f in ("predictions.jsonl", "predictions.csv")}
    with pytest.raises(UadcError, match="was not written by uadc predict"):
        predict_paths(det, [test / "good"], out=out, overlays=True)
    assert theirs.read_bytes() == b"the user's notes"
    assert {f: (out / f).read_bytes() for f in tables} == tables
    # one of uadc's own that the tables do not name (a run killed while its overlays moved in, before its tables):
    # the rerun was refused until the folder was cleaned by hand
    theirs.unlink()
    predict_paths(det, [test / "good"], out=out, overlays=True)
    orphan = out / second.records[0]["overlay"]
    (out / "predictions.jsonl").write_text("")
    predict_paths(det, [test / "good"], out=out, overlays=True)
    assert orphan.is_file()
    # ... but not one reached through a linked folder (an archive of earlier overlays): refused as before
    import shutil
    archive = tmp_path / "archive"
    shutil.move(str(orphan.parent), archive)
    orphan.parent.symlink_to(archive, target_is_directory=True)
    (out / "predictions.jsonl").write_text("")
    with pytest.raises(UadcError, match="was not written by uadc predict"):
        predict_paths(det, [test / "good"], out=out, overlays=True)


def test_a_run_stopped_half_way_leaves_the_out_folder_as_it_was(int8_artifact, tiny_data, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) half-way through `uadc predict --overlays` left the overlays written so far
    beside the earlier run's tables, some of them overwritten: two runs mixed, no table naming them."""
    from uadc.runtime import Detector, batch
    det = Detector.load(int8_artifact[2].path)
    out, test = tmp_path / "p", tiny_data / "gray" / "test"
    batch.predict_paths(det, [test / "good"], out=out, overlays=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    made = []
    real = batch.overlay

    def stop_at_the_third(*args):
        made.append(1)
        if len(made) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(batch, "overlay", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        batch.predict_paths(det, [test], out=out, overlays=True, batch_size=1)
    assert len(made) == 3 and {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".overlays")]    # no staging folder left
    monkeypatch.undo()
    run = batch.predict_paths(det, [test], out=out, overlays=True)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.png")) == \
        sorted(r["overlay"] for r in run.records) and all(p.is_file() for p in run.written)


def test_ctrl_c_while_the_overlays_move_in_lands_after_the_tables(int8_artifact, tiny_data, tmp_path, monkeypatch,
                                                                  ctrl_c_raises):
    """The overlays moved in one by one, then the tables were written: Ctrl-C in between left part of a
    run's overlays beside the earlier run's tables, named by neither. Now the signal waits for both."""
    import os
    import signal
    from uadc.core import io as uio
    from uadc.runtime import Detector, batch
    det = Detector.load(int8_artifact[2].path)
    out, test = tmp_path / "p", tiny_data / "gray" / "test"
    batch.predict_paths(det, [test / "good"], out=out, overlays=True)
    real, moved = os.replace, []

    def interrupted(src, dst):
        if (out / "overlays") not in Path(dst).parents or "uadc-tmp" in str(dst):   # an overlay's own write
            return real(src, dst)
        moved.append(dst)
        if len(moved) == 2:
            signal.raise_signal(signal.SIGINT)   # as a Ctrl-C typed at that moment
        return real(src, dst)

    monkeypatch.setattr(uio.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        batch.predict_paths(det, [test], out=out, overlays=True)
    monkeypatch.undo()
    assert len(moved) > 2 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    named = sorted(json.loads(line)["overlay"] for line in (out / "predictions.jsonl").read_text().splitlines())
    assert sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.png")) == named
    assert len(named) == len([f for f in test.rglob("*.png")])   # the whole new run, nothing of the old


def test_staged_files_move_in_on_success_only_and_across_disks(tmp_path, monkeypatch):
    import errno
    import os
    from uadc.core import io as uio
    final = tmp_path / "overlays"
    with uio.staged_files(final) as stage:
        uio.atomic_write_bytes(stage / "a" / "x.png", b"1")
    assert (final / "a" / "x.png").read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == ["overlays"]
    with pytest.raises(RuntimeError), uio.staged_files(final) as stage:
        uio.atomic_write_bytes(stage / "a" / "x.png", b"2")
        raise RuntimeError
    assert (final / "a" / "x.png").read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == ["overlays"]
    real = os.replace

    def no_rename_across(src, dst):   # out/overlays a link to another disk
        if ".uadc-tmp-" in str(src) and not str(src).endswith(".tmp"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(uio.os, "replace", no_rename_across)
    with uio.staged_files(final) as stage:
        uio.atomic_write_bytes(stage / "a" / "x.png", b"3")
    assert (final / "a" / "x.png").read_bytes() == b"3" and [p.name for p in tmp_path.iterdir()] == ["overlays"]
    # a new --out folder made for a run that could write nothing (a full disk) is not left behind, empty
    monkeypatch.setattr(uio.os, "replace", real)
    with pytest.raises(uio.UadcError, match="No space left"), uio.staged_files(tmp_path / "new" / "overlays") as stage:
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "new").exists()


def test_runs_sharing_an_out_folder_take_turns(int8_artifact, tiny_data, tmp_path, caplog):
    """Two `uadc predict --out same` at once could leave one run's predictions.jsonl beside the
    other's predictions.csv; the second now waits for the first."""
    import threading
    from uadc.core.io import file_lock
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    out = tmp_path / "shared"
    caplog.set_level("INFO", logger="uadc")
    with file_lock(out):                     # another run holds the folder
        t = threading.Thread(target=predict_paths, args=(det, [tiny_data / "gray" / "test" / "good"]),
                             kwargs={"out": out})
        t.start()
        t.join(2.0)
        assert t.is_alive() and not (out / "predictions.csv").exists()
        assert f"waiting for another uadc process writing {out}" in caplog.text   # it waited without a word
    t.join(60)
    assert not t.is_alive() and (out / "predictions.csv").is_file() and (out / "predictions.jsonl").is_file()


def test_detector_inputs_and_errors(int8_artifact, tiny_data):
    from uadc.runtime import Detector, Prediction
    _, _, res = int8_artifact
    det = Detector.load(res.path)
    assert det.backend_name == "onnxruntime"  # an ort-cpu-* artifact, whatever else imports
    with pytest.raises(UadcError, match="backend must be auto, onnxruntime, openvino or tensorrt, got 'onnx'"):
        Detector.load(res.path, backend="onnx")
    f = sorted((tiny_data / "gray" / "test" / "blob").glob("*.png"))[0]
    one = det.predict(f, category="gray")
    assert isinstance(one, Prediction) and one.anomaly_map.shape == (64, 64) and one.mask.dtype == bool
    assert one.label == int(one.score >= one.threshold) and (one.normalized_score >= 0.5) == bool(one.label)
    arr = np.asarray(Image.open(f))
    again = det.predict([arr, Image.open(f)], category="gray")
    assert [p.score for p in again] == pytest.approx([one.score] * 2, abs=1e-6)
    glob = det.predict(f)
    assert glob.category is None and glob.threshold == det.manifest.thresholds.global_.image.value
    with pytest.raises(UadcError, match="unknown category"):
        det.predict(f, category="nope")
    with pytest.raises(UadcError, match="image array"):
        det.predict(np.zeros((5, 5, 7), np.float64))
    # an image among several is named by its place (a batch array has no file names); channels first is hinted
    with pytest.raises(UadcError, match=r"^input 1: image array: .* got float64 \(3, 64, 64\) "
                                        r"\(channels first\? pass HxWx3\)$"):
        det.predict([arr, np.zeros((3, 64, 64))])
    with pytest.raises(UadcError, match=r"^input 2: image array: empty"):
        det.predict([arr, arr, np.zeros((0, 4), np.uint8)])
    import torch   # a tensor is an array: iterated as a batch, its one image was scored as 64 rows
    rgb = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")))
    assert det.predict(rgb, category="gray").score == pytest.approx(one.score, abs=1e-6)
    assert len(det.predict(torch.stack([rgb, rgb]), category="gray")) == 2
    class Paths:   # a pandas Series of paths (1-D, with __array__) stays a batch
        ndim = 1
        def __array__(self, dtype=None, copy=None):
            return np.array([str(f), str(f)])
        def __iter__(self):
            return iter([f, f])
    assert len(det.predict(Paths(), category="gray")) == 2
    paths = det.predict(np.array([str(f), str(f)]), category="gray")   # refused as one malformed image array
    assert len(paths) == 2 and paths[0].source == str(f)
    with pytest.raises(UadcError, match="image array"):   # bytes: numpy drops their trailing zeros, so no batch
        det.predict(np.array([f.read_bytes(), f.read_bytes()]))
    rerun = det.predict(f, category="gray")   # the same result, whatever the timing: it never compared equal
    assert dataclasses.replace(rerun, latency_ms=one.latency_ms + 5) == one
    with pytest.raises(UadcError, match=r"^image: a Tensor numpy cannot read \(.*\); pass a CPU array"):
        det.predict(rgb.float().div(255).requires_grad_(), category="gray")   # torch's RuntimeError, raw
    with pytest.raises(UadcError, match=r"^image: expected a path, image bytes, .* got int$"):   # "got int64 ()"
        det.predict(3)
    with pytest.raises(UadcError, match=r"^inputs: expected an image or a list of images, got a dict$"):
        det.predict({str(f): 1})     # its keys were read as paths
    bomb = tiny_data.parent / f"bomb-{os.getpid()}.png"      # 46 KB that claims 20000 x 20000 pixels
    Image.new("1", (20000, 20000)).save(bomb)
    try:
        with pytest.raises(UadcError, match="unreadable image .*DecompressionBombError") as e:
            det.predict(bomb)
        assert "\n" not in str(e.value)
    finally:
        bomb.unlink()


def test_detector_takes_encoded_bytes_and_a_category_per_image_and_refuses_silent_nonsense(int8_artifact, tiny_data):
    """What a service embeds: encoded bytes from a camera or an HTTP body, a mixed batch of
    products, and arrays that would otherwise score silently wrong (empty, float 0..255, NaN)."""
    import io
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    det = Detector.load(res.path)
    f = sorted((tiny_data / "gray" / "test" / "blob").glob("*.png"))[0]
    one = det.predict(f, category="gray")
    raw = f.read_bytes()
    with open(f, "rb") as fh:
        same = [det.predict(raw, category="gray"), det.predict(io.BytesIO(raw), category="gray"),
                det.predict(fh, category="gray"), det.predict(bytearray(raw), category="gray")]
    assert [p.score for p in same] == [one.score] * 4 and all(p.source is None for p in same)
    other = [c for c in det.categories if c != "gray"][0]
    mixed = det.predict(iter([f, raw, f]), category=["gray", other, None])
    assert [p.category for p in mixed] == ["gray", other, None]
    assert [p.threshold for p in mixed] == [det.thresholds(c).image.value for c in ("gray", other, None)]
    assert mixed[0].score == pytest.approx(one.score, abs=1e-6)
    # a batch at a time (peak memory): chunk boundaries keep each image's score and category
    files = sorted((tiny_data / "gray" / "test").rglob("*.png"))[:5]
    cats = ["gray", other, None, "gray", other]
    small = Detector.load(res.path, batch_size=2).predict(files, category=cats)
    whole = det.predict(files, category=cats)
    assert [(p.category, p.source, p.threshold) for p in small] == [(p.category, p.source, p.threshold) for p in whole]
    assert [p.score for p in small] == pytest.approx([p.score for p in whole], abs=1e-6)
    for cat in (["gray"], ["gray", "gray", "gray"], ["gray", 3]):
        with pytest.raises(UadcError, match="one name for all images or one per image"):
            det.predict([f, f], category=cat)
    with pytest.raises(UadcError, match="unknown category 'nope'"):
        det.predict([f, f], category=["gray", "nope"])
    with pytest.raises(UadcError, match=r"decide: expected maps \(N, H, W\) and scores \(N,\), got \(2, 32, 32\) and \(3,\)"):
        det.decide(np.zeros((2, 32, 32), np.float32), np.zeros(3, np.float32))   # numpy's broadcast error
    with pytest.raises(UadcError, match="verify: expected True or False, got 'x'"):
        __import__("uadc").read_manifest(res.path, verify="x")
    for cat in (3, {"gray"}):    # a TypeError from list(3) before; a set has no order to pair with images
        with pytest.raises(UadcError, match="^category: a name or None for one image, got "):
            det.predict(f, category=cat)
        with pytest.raises(UadcError, match="one name for all images or one per image"):
            det.predict([f, f], category=cat)
    with pytest.raises(UadcError, match="a folder, not an image file"):     # said 'not a regular file'
        det.predict(f.parent)
    size = det.image_size
    bad = {"empty": np.zeros((0, 0, 3), np.uint8), "must be finite and in \\[0, 1\\], got 0..255":
           np.linspace(0, 255, size * size * 3, dtype=np.float32).reshape(size, size, 3),
           "non-finite": np.full((size, size, 3), np.nan, np.float32)}
    for msg, arr in bad.items():
        with pytest.raises(UadcError, match=msg):
            det.predict(arr)
    assert det.predict(np.full((size, size, 3), 0.5, np.float32)).score > 0   # a float image in [0, 1] still runs
    # careless handles: a file opened in text mode (its read() fails to decode a PNG), a closed file, a
    # closed PIL image: one UadcError each, not UnicodeDecodeError / ValueError from deep inside
    from PIL import Image
    closed_image, closed_file = Image.open(f), open(f, "rb")
    closed_image.close()
    closed_file.close()
    with open(f) as text:
        for handle, msg in ((text, "expected a binary file object"), (closed_file, "cannot read it"),
                            (closed_image, "cannot read its pixels")):
            with pytest.raises(UadcError, match=msg):
                det.predict(handle)
    with pytest.raises(UadcError, match="^unreadable image bytes: "):
        det.predict(b"not an image")
    with pytest.raises(UadcError, match="expected a path, image bytes, a binary file, a PIL image or an array, got NoneType"):
        det.predict([f, None])


def test_file_names_that_are_not_utf8_are_written_as_escapes(int8_artifact, tmp_path, tiny_data):
    """A file named in latin-1 (a zip made on Windows, unpacked here): `uadc predict --out` wrote
    predictions.jsonl, then failed on predictions.csv with a UnicodeEncodeError traceback. Both tables
    now give the name's bytes as \\xNN, and the overlay column names the overlay file on disk."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    cam = tmp_path / "cam"
    cam.mkdir()
    src = sorted((tiny_data / "gray" / "test" / "good").iterdir())[0]
    shutil.copy(src, os.fsdecode(os.fsencode(cam) + b"/caf\xe9.png"))
    run = predict_paths(det, [cam], category="gray", out=tmp_path / "out", overlays=True)
    row = json.loads((tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8"))
    assert row["path"] == str(cam / "caf\\xe9.png") and row["overlay"] == "overlays/cam/caf\\xe9.png"
    assert (tmp_path / "out" / row["overlay"]).is_file()
    csv_row = (tmp_path / "out" / "predictions.csv").read_text(encoding="utf-8").splitlines()[1]
    assert csv_row.startswith(row["path"] + ",gray,") and csv_row.endswith(row["overlay"] + ",")   # no error
    assert len(run.records) == 1
    (junk := Path(os.fsdecode(os.fsencode(cam) + b"/bad\xe9.png"))).write_bytes(b"junk")   # Pillow's repr: `\udce9`
    run = predict_paths(det, [junk], category="gray", out=tmp_path / "out2")
    assert run.failed[0][1] == f"unreadable image {cam}/bad\\xe9.png: not a PNG, JPEG, BMP or TIFF image (uadc reads " \
                               f"those only)", run.failed


def test_artifact_paths_that_were_misreported(int8_artifact, tmp_path, monkeypatch):
    """A folder named in latin-1 ended in pybind's "incompatible constructor arguments" (cut off); the
    model file for its folder said "artifact folder not found"; a broken link as --out "File exists"."""
    from uadc.core.io import ensure_dir
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    latin1 = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    shutil.copytree(res.path, latin1)
    assert Detector.load(latin1).manifest.target == "ort-cpu-int8"
    with pytest.raises(UadcError, match=f"not an artifact folder: {res.path / 'model.onnx'} is a file; give the "
                                        f"folder that holds its artifact.json"):
        Detector.load(res.path / "model.onnx")
    from uadc.runtime.batch import predict_paths
    for out in (latin1, latin1 / "sub"):    # written into the artifact, which then held files its manifest does not list
        said = "an artifact folder; choose another" if out == latin1 else f"inside the artifact folder {latin1}; choose a"
        with pytest.raises(UadcError, match=f"--out {out}: {said} folder"):
            predict_paths(Detector.load(res.path), [res.path / "model.onnx"], out=out)
    assert sorted(p.name for p in latin1.iterdir()) == sorted(p.name for p in res.path.iterdir())
    from click.testing import CliRunner

    from uadc.cli import main
    monkeypatch.chdir(latin1)   # the default --out inside the artifact: named as the default, not as typed
    r = CliRunner().invoke(main, ["predict", ".", str(res.path / "model.onnx")])
    assert r.exit_code == 2 and "the default --out predictions: inside the artifact folder" in r.output
    assert r.output.rstrip().endswith("choose a folder outside it, with --out DIR"), r.output
    import uadc   # a bundle's source as typed (relative) beside its absolute path
    monkeypatch.chdir(res.path.parent)
    assert uadc.bundle(res.path.name, tmp_path / "b1").source == res.path
    (tmp_path / "deep" / "sub").mkdir(parents=True)   # through a link, then `..`: folded as text it named another
    (tmp_path / "lnk").symlink_to(tmp_path / "deep" / "sub")   # folder (a FileNotFoundError traceback)
    shutil.copytree(res.path, tmp_path / "deep" / "art")
    monkeypatch.chdir(tmp_path)
    assert uadc.bundle(Path("lnk/../art"), tmp_path / "b2").source == tmp_path / "lnk" / ".." / "art"
    assert uadc.bundle("deep/art", Path("..") / tmp_path.name / "b3").path == tmp_path / "b3"   # it kept the ..
    assert uadc.bundle("deep/art", Path("..") / tmp_path.name / "new" / "b4").path == tmp_path / "new" / "b4"
    with pytest.raises(UadcError, match=r"an artifact of target ort-cpu-int8 has no TensorRT engine; backend auto "
                                        r"or onnxruntime$"):      # "run build_engine.sh", which it has not
        Detector.load(res.path, backend="tensorrt")
    if importlib.util.find_spec("tensorrt") is None:   # an engine but no TensorRT: Polygraphy's traceback, exit 1
        shutil.copytree(res.path, tmp_path / "eng")
        (tmp_path / "eng" / "model.engine").write_bytes(b"junk")
        with pytest.raises(UadcError, match=r"^backend tensorrt: the tensorrt Python package does not import here"):
            Detector.load(tmp_path / "eng", backend="tensorrt")
        said = Detector.load(tmp_path / "eng").warnings   # auto ran the ONNX on the CPU without a word
        assert any("model.engine is here but TensorRT cannot run here (tensorrt does not import): running model.onnx "
                   "on ONNX Runtime" in w for w in said), said
        # TensorRT but no Polygraphy (a runtime-only install on a device): "install uadc's dependencies again",
        # which pulls torch onto the device, and a raw ModuleNotFoundError from Detector.load
        import uadc.runtime.detector as det
        with monkeypatch.context() as m:
            m.setattr(det, "_importable", lambda module: module != "polygraphy")
            with pytest.raises(UadcError, match=r"^backend tensorrt: the polygraphy Python package .*pip install polygraphy"):
                Detector.load(tmp_path / "eng", backend="tensorrt")
            said = Detector.load(tmp_path / "eng").warnings
        assert any("polygraphy, which runs the engine, does not import (pip install polygraphy)" in w for w in said)
        # an engine of another TensorRT version (a JetPack upgrade), or damaged: Polygraphy's 21-frame traceback
        fake = tmp_path / "fake" / "tensorrt"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(textwrap.dedent("""
            __version__ = "10.3.0"
            class ILogger:
                class Severity:
                    VERBOSE = 0; INFO = 1; WARNING = 2; ERROR = 3; INTERNAL_ERROR = 4
                def __init__(self, *a, **k): pass
            Logger = ILogger
            class Runtime:
                def __init__(self, logger): pass
                def __enter__(self): return self
                def __exit__(self, *a): return False
                def deserialize_cuda_engine(self, buf): return None
            def init_libnvinfer_plugins(*a, **k): return True
            """))
        code = f"import uadc; uadc.Detector.load({str(tmp_path / 'eng')!r}, backend='tensorrt')"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(fake.parent)})
        assert "UadcError" in r.stderr and "TensorRT cannot load it" in r.stderr and \
            "run build_engine.sh again on this device" in r.stderr, r.stderr[-2000:]
    (tmp_path / "dang").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UadcError, match=f"cannot create folder {tmp_path / 'dang'}: it is a broken link"):
        ensure_dir(tmp_path / "dang")


def test_a_schedule_on_another_runtime_is_refused(int8_artifact):
    """`uadc predict --backend openvino --schedule branches` ran, the schedule silently ignored."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra (uadc[openvino])")
    from uadc.runtime import Detector
    path = int8_artifact[2].path
    with pytest.raises(UadcError, match="schedule 'branches' applies to ONNX Runtime, not to the OpenVINO backend"):
        Detector.load(path, backend="openvino", schedule="branches")
    assert Detector.load(path, backend="openvino").backend_name == "openvino"
    from uadc.backends.parallel import available_cores   # OpenVINO capped more threads than cores without a word
    assert Detector.load(path, backend="openvino", threads=1024).warnings[0] == \
        f"threads 1024: this process may run on {available_cores()} core(s); using {available_cores()}"


def test_a_bf16_artifact_on_an_fp32_runtime_says_its_thresholds_may_not_fit(int8_artifact, tiny_data, tmp_path, caplog,
                                                                           monkeypatch):
    """An openvino-cpu-bf16 artifact run with `--backend onnxruntime` (or without openvino installed)
    applied thresholds set on bf16 outputs to fp32 ones without a word. Its kNN bank is made of bf16
    features too: ONNX Runtime scored one 1.4x higher, so backend auto refuses to fall back to it, and to an
    OpenVINO that runs f32 on this CPU; on OpenVINO in bf16 it said the same, falsely ("OpenVINO" != "openvino")."""
    import logging
    from uadc.runtime import Detector, detector
    folder = _edited_artifact(int8_artifact[2].path, tmp_path / "bf16", target="openvino-cpu-bf16",
                              runtime="openvino")
    with caplog.at_level(logging.WARNING, logger="uadc"):
        Detector.load(folder, backend="onnxruntime")
        Detector.load(int8_artifact[2].path, backend="onnxruntime")   # its own runtime: no warning
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    said = "its thresholds and kNN bank were made by OpenVINO in bf16, and ONNX Runtime computes in fp32 here"
    assert len(warned) == 1 and said in warned[0], warned
    if detector._importable("openvino"):
        from uadc.backends import openvino as ov
        ran = Detector.load(folder, backend="openvino")
        assert (ran.warnings == []) is (ov.precision_here("bf16") == "bf16"), ran.warnings
        monkeypatch.setattr(detector._OvBackend, "__init__", lambda self, *a: self.__dict__.update(
            precision="f32", lock=threading.Lock(), run_fn=None))
        with pytest.raises(UadcError, match="OpenVINO computes in f32 here: .*choose the backend to run it anyway"):
            Detector.load(folder)   # a CPU without bf16: OpenVINO takes the hint and computes in f32
    from uadc.backends import openvino as ov_backend
    monkeypatch.setattr(ov_backend, "import_error", lambda: "OpenVINO is not installed: pip install 'uadc[openvino]'")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uadc"), \
            pytest.raises(UadcError, match="ONNX Runtime computes in fp32 here: .*run it where OpenVINO runs bf16"):
        Detector.load(folder)
    assert "running it on ONNX Runtime" not in caplog.text   # refused: no line saying it runs there
    caplog.clear()   # an INT8 artifact of one runtime on another: its kernels round INT8 differently
    ov_int8 = _edited_artifact(int8_artifact[2].path, tmp_path / "ovint8", target="openvino-cpu-int8", runtime="openvino")
    with caplog.at_level(logging.WARNING, logger="uadc"):
        det = Detector.load(ov_int8, backend="onnxruntime")
    said = "its thresholds were set on OpenVINO's INT8 kernels; ONNX Runtime rounds INT8 differently"
    assert said in caplog.text and len(det.warnings) == 1 and said in det.warnings[0]
    # a TensorRT INT8 artifact's thresholds were set on ONNX Runtime's emulation: OpenVINO ran it without a word
    from types import SimpleNamespace
    trt = SimpleNamespace(runtime="tensorrt", target="trt-int8", folder="T")
    for backend, warned in (("OpenVINO", True), ("ONNX Runtime", False), ("TensorRT", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="uadc"):
            detector._check_precision(trt, backend)
        assert ("T: its thresholds were set on ONNX Runtime's INT8 kernels; OpenVINO rounds" in caplog.text) is warned
    # `uadc predict --json` listed only the category warning: a pipeline reading stdout never saw this one
    from click.testing import CliRunner
    from uadc.cli import main
    res = CliRunner().invoke(main, ["predict", str(ov_int8), str(tiny_data / "gray" / "test"), "--backend",
                                    "onnxruntime", "--out", str(tmp_path / "p"), "--json"])
    doc = json.loads(res.stdout)
    assert [w for w in doc["warnings"] if said in w] == det.warnings, (res.output, doc)


def test_a_path_through_a_category_folder_is_judged_by_the_folder_it_is_in(tmp_path, monkeypatch):
    """`uadc predict art stripes/../../odd/x.png` judged x.png as a `stripes` image (its thresholds),
    while `odd/x.png` took the global ones: the verdict changed with how the path was written."""
    from uadc.core.manifest import infer_category
    cats = ["stripes", "gray"]
    assert infer_category(Path("data/stripes/test/../../odd/x.png"), cats) is None
    assert infer_category(Path("data/stripes/../gray/x.png"), cats) == "gray"
    assert infer_category(Path("data/stripes/test/good/x.png"), cats) == "stripes"
    (tmp_path / "gray").symlink_to(tmp_path)   # a linked folder's own name still counts
    assert infer_category(tmp_path / "gray" / "x.png", cats) == "gray"
    # the folder it is run from counts (`uadc predict art .` in gray/test), and named_in says it was not in the path
    from uadc.core.manifest import named_in
    (tmp_path / "real" / "gray").mkdir(parents=True)   # a real folder: the working folder is its resolved path
    monkeypatch.chdir(tmp_path / "real" / "gray")
    assert infer_category(Path("cam1/x.png"), cats) == "gray" and not named_in(Path("cam1/x.png"), "gray")
    assert named_in(Path("../gray/cam1/x.png"), "gray") and not named_in(Path("gray"), "gray")   # a file's folders


def test_a_user_mistake_in_predict_leaves_no_out_folder_or_lock(int8_artifact, tiny_data, tmp_path, monkeypatch):
    """An unknown --category or no images at all were refused after the lock was taken: `--out new/sub`
    left new/ and new/.sub.lock behind, the default out a ./.predictions.lock."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UadcError, match="unknown category 'nope'"):
        predict_paths(det, [tiny_data / "gray" / "test"], category="nope", out=Path("new/sub"))
    with pytest.raises(UadcError, match="no images found in empty"):
        predict_paths(det, [Path("empty")], out=Path("predictions"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_more_threads_than_cores_are_the_cores(int8_artifact, tiny_data, tmp_path, caplog):
    """`uadc predict --threads 64` on 2 cores opened 64 sessions (each its own copy of the model) and ran
    six times slower than with 2; compile's report said 4 threads of a latency the runtime took on 2."""
    import logging
    import uadc
    from uadc.backends.parallel import ParallelSession, available_cores
    many, said = available_cores() + 5, f"threads {available_cores() + 5}: this process may run on {available_cores()} core"
    with caplog.at_level(logging.WARNING, logger="uadc"), \
            ParallelSession(int8_artifact[2].path / "model.onnx", many) as sess:
        assert sess.threads == available_cores() and len(sess._chunks) in (0, available_cores())
    assert said in caplog.text
    from click.testing import CliRunner
    from uadc.cli import main
    res = CliRunner().invoke(main, ["predict", str(int8_artifact[2].path), str(tiny_data / "gray" / "test"), "--threads",
                                    str(many), "--out", str(tmp_path / "p"), "--json"])
    assert [w for w in json.loads(res.stdout)["warnings"] if w.startswith(said)], res.output   # on stderr only before
    recipe, art, _ = int8_artifact
    rep = uadc.compile(recipe, "ort-cpu-fp32", artifacts=art, out=tmp_path / "c", threads=many, latency_runs=2,
                       evaluate=False)
    assert rep.latency.threads == available_cores() == rep.environment["threads"], rep.latency


def test_a_model_that_is_not_the_artifacts_own_is_refused(int8_artifact, tmp_path):
    """A model.onnx swapped for another one (its sha256 in artifact.json updated too: the golden
    reference, the FP32 model of another compile) ran at this artifact's thresholds."""
    import onnx
    from uadc.runtime import Detector
    src = int8_artifact[2].path
    golden = onnx.load(str(src / "golden_reference.onnx")) if (src / "golden_reference.onnx").is_file() else None
    other = onnx.load(str(src / "model.onnx"))
    for p in other.metadata_props:
        if p.key == "uadc.deploy":
            p.value = p.value.replace('"int8"', '"fp32"')
    for name, model in (("other", other), ("golden", golden)):
        if model is None:
            continue
        folder = _edited_artifact(src, tmp_path / name, model=model)
        with pytest.raises(UadcError, match="is not the model artifact.json was written for"):
            Detector.load(folder)
    assert Detector.load(_edited_artifact(src, tmp_path / "same")).backend_name == "onnxruntime"   # consistent edit


def test_a_model_whose_outputs_do_not_fit_or_are_not_finite_gets_no_verdict(int8_artifact, tmp_path, tiny_data):
    """A NaN score compares False with every threshold: the image was called good, and predictions.jsonl
    held a bare NaN (invalid JSON). A score per channel, or a map of another size, was decided silently."""
    import onnx
    from onnx import TensorProto, helper
    from uadc.core.errors import NonFiniteOutputs, RuntimeFault
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    src = int8_artifact[2].path
    size = Detector.load(src).image_size

    def model(score_nodes, score_shape, map_size):
        nodes = [helper.make_node("ReduceMax", ["image"], ["m"], axes=[1], keepdims=1),
                 helper.make_node("Resize", ["m", "", "scales"], ["anomaly_map"]), *score_nodes]
        scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, map_size / size, map_size / size])
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                          ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("score", TensorProto.FLOAT, score_shape)], [scales])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        m.metadata_props.extend(onnx.load(str(src / "model.onnx")).metadata_props)
        return m
    nan = model([helper.make_node("ReduceMin", ["image"], ["r"], axes=[1, 2, 3], keepdims=0),
                 helper.make_node("Log", ["r"], ["score"])], ["batch"], size)   # log of a negative value: NaN
    wide = model([helper.make_node("ReduceMax", ["image"], ["score"], axes=[2, 3], keepdims=0)], ["batch", 3], size)
    small = model([helper.make_node("ReduceMax", ["image"], ["score"], axes=[1, 2, 3], keepdims=0)], ["batch"],
                  size // 2)
    good = tiny_data / "gray" / "test" / "good"
    det = Detector.load(_edited_artifact(src, tmp_path / "nan", model=nan))
    with pytest.raises(NonFiniteOutputs, match="NaN/Inf"):
        det.predict(sorted(good.iterdir())[0])
    run = predict_paths(det, good, out=tmp_path / "out")
    assert run.records == [] and len(run.failed) == len(list(good.iterdir())) and run.exit_code == 1
    assert run.summary()["failures"][0]["error"].endswith("check the artifact with `uadc verify`)")
    for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines():   # the category: it named none
        assert json.loads(line, parse_constant=pytest.fail).keys() - {"path", "error"} == {"category"}
        assert json.loads(line)["category"] == "gray"
    assert {r["category"] for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))} == {"gray"}
    for name, m in (("wide", wide), ("small", small)):
        det = Detector.load(_edited_artifact(src, tmp_path / name, model=m))
        with pytest.raises(RuntimeFault, match="expected \\[1, .*\\] and \\[1\\]"):
            det.predict(sorted(good.iterdir())[0])
    # a graph the runtime fails to run (an allocation, a shape only known then): ORT's traceback before
    fails = model([helper.make_node("Reshape", ["image", "seven"], ["score"])], ["batch"], size)
    fails.graph.initializer.append(helper.make_tensor("seven", TensorProto.INT64, [1], [7]))
    det = Detector.load(_edited_artifact(src, tmp_path / "fails", model=fails))
    with pytest.raises(RuntimeFault, match="ONNX Runtime failed to run the model: .*"):
        det.predict(sorted(good.iterdir())[0])


def test_run_takes_preprocessed_batches_only(int8_artifact):
    """Detector.run with an empty batch, another size or a single image raised numpy's / ONNX Runtime's own errors."""
    from uadc.runtime import Detector, read_manifest
    det = Detector.load(int8_artifact[2].path)
    s = det.image_size
    for bad in (np.zeros((0, 3, s, s), np.float32), np.zeros((1, 3, s // 2, s // 2), np.float32),
                np.zeros((3, s, s), np.float32), [["a"]]):
        with pytest.raises(UadcError, match=f"run: expected preprocessed images .*\\(N, 3, {s}, {s}\\)"):
            det.run(bad)
    assert det.run(np.zeros((2, 3, s, s)))[1].shape == (2,)
    with pytest.raises(UadcError, match="artifact: expected a path"):
        read_manifest(None)


def test_folder_walks_survive_link_loops_and_judge_folders_that_once_received_out(int8_artifact, tmp_path, tiny_data):
    """A symlink loop named like an image ended `uadc predict` with a RuntimeError traceback; a camera
    folder that once received `--out` was left out whole from a later run over its parent (its parts
    unjudged, exit 0); `list_images("folder")` walked "/" a character at a time."""
    from PIL import Image
    from uadc.runtime import Detector, list_images
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    line = tmp_path / "line"
    for cam in ("cam1", "cam2"):
        shutil.copytree(tiny_data / "gray" / "test" / "good", line / cam)
    n = len(list((line / "cam1").iterdir()))
    (line / "cam2" / "l1.png").symlink_to("l2.png")
    (line / "cam2" / "l2.png").symlink_to("l1.png")
    predict_paths(det, [line / "cam1"], category="gray", out=line / "cam1", overlays=True)
    run = predict_paths(det, [line], category="gray", out=tmp_path / "results")
    assert len(run.records) == 2 * n, run.left_out
    assert run.left_out == {"broken link": 2, "in a uadc predict output folder": n}
    assert len(list_images(str(line / "cam2"))) == n == len(list_images(line / "cam2"))
    assert len(predict_paths(det, line / "cam2", category="gray").records) == n
    with pytest.raises(UadcError, match="empty, 0x0 pixels"):
        det.predict(Image.new("RGB", (0, 0)))


def test_runs_into_one_out_folder_share_one_lock_however_it_is_spelt(tmp_path, monkeypatch):
    """The lock was named after the spelling: `--out o` and a link to it locked different files, and
    `--out .` made `..lock` in the parent."""
    from uadc.core.io import file_lock
    real = tmp_path / "o"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(real)
    with file_lock(tmp_path / "o"):
        for spelling in (tmp_path / "link", Path("."), tmp_path / "o" / ".." / "o"):
            with pytest.raises(UadcError, match="is being written by another uadc process"):
                with file_lock(spelling, timeout=0):
                    pass
    assert not (tmp_path / "o" / "..lock").exists() and (tmp_path / ".o.lock").exists()


def test_overlays_linked_to_another_folder_are_replaced_without_a_traceback(int8_artifact, tiny_data, tmp_path):
    """With out/overlays a link (another disk), a run after one with overlays removed the stale ones, then
    ended in NotADirectoryError: the emptied-folder cleanup called rmdir on the link."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    _, _, res = int8_artifact
    det = Detector.load(res.path, threads=1)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "overlays").symlink_to(elsewhere)
    predict_paths(det, [tiny_data / "gray" / "test"], out=out, overlays=True)
    assert list(elsewhere.rglob("*.png"))
    photo = elsewhere / "vacation.png"            # not uadc's: a line naming it made the next run delete it
    Image.new("RGB", (8, 8)).save(photo)
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"path": "x.png", "score": 0.1, "verdict": "good", "overlay": "overlays/vacation.png"}\n')
    predict_paths(det, [tiny_data / "gray" / "test"], out=out)      # no overlays now: the earlier ones are stale
    assert (out / "overlays").is_symlink() and elsewhere.is_dir() and [p.name for p in elsewhere.rglob("*.png")] == \
        ["vacation.png"]


def test_split_partitions_of_a_postprocessed_model_keep_its_category_input(int8_artifact):
    """`compile --split --postprocess`: head.onnx lost the `category` input (a constant at its default, the
    global thresholds), so teacher -> student -> head decided otherwise than model.onnx."""
    import onnx
    from uadc.core.ort_session import make_session
    from uadc.export.partitions import partition_models
    model = onnx.load(str(int8_artifact[2].path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["image", "category"]
    subs = partition_models(model)
    assert "category" in [i.name for i in subs["head"].graph.input]
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    feeds = {"image": x, "category": np.array([0, 0, 1, 1], np.int64)}
    whole = make_session(model, 1)
    want = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feeds)))
    env = dict(feeds)
    for p in ("teacher", "student", "head"):
        s = make_session(subs[p], 1)
        env.update(zip([o.name for o in s.get_outputs()], s.run(None, {i.name: env[i.name] for i in s.get_inputs()})))
    for name, value in want.items():
        np.testing.assert_array_equal(env[name], value, err_msg=name)
    # head.onnx listed its outputs in a set's order, which changed with the process's hash seed (not reproducible;
    # a reader by position got another tensor on some runs)
    code = (f"import onnx; from uadc.export.partitions import partition_models as p; print([o.name for o in "
            f"p(onnx.load({str(int8_artifact[2].path / 'model.onnx')!r}))['head'].graph.output])")
    orders = {subprocess.run([PY, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)}, capture_output=True,
                             text=True, check=True).stdout for seed in (1, 2, 3, 4)}
    assert orders == {f"{[o.name for o in model.graph.output]}\n"}, orders


def test_an_unverified_load_reads_no_model_from_outside_the_artifact(int8_artifact, tmp_path):
    """``Detector.load(..., verify=False)`` skipped the only check of ``model_file``: an artifact.json naming
    ``../elsewhere/model.onnx`` (or an absolute path) loaded and ran a model from outside the folder."""
    from uadc.runtime import Detector
    src = int8_artifact[2].path
    shutil.copytree(src, tmp_path / "elsewhere")
    for i, name in enumerate(("../elsewhere/model.onnx", str(tmp_path / "elsewhere" / "model.onnx"))):
        folder = tmp_path / f"a{i}"
        shutil.copytree(src, folder)
        meta = json.loads((folder / "artifact.json").read_text())
        (folder / "artifact.json").write_text(json.dumps({**meta, "model_file": name}))
        for verify in (False, True):
            with pytest.raises(UadcError, match=r"artifact\.json: file entry .* leaves the artifact folder$"):
                Detector.load(folder, verify=verify)
    import uadc   # a name longer than a file name can be: a raw OSError (ENAMETOOLONG) from the API
    meta = json.loads((folder / "artifact.json").read_text())
    (folder / "artifact.json").write_text(json.dumps({**meta, "model_file": "model.onnx",
                                                      "files": {**meta["files"], "a" * 5000: "0" * 64}}))
    with pytest.raises(UadcError, match=r"artifact\.json: file entry 'a+'\.\.\. is longer than a file name can be$"):
        uadc.read_manifest(folder)


def test_wrong_types_at_the_runtimes_helpers_are_one_line(int8_artifact):
    """A list as the category (TypeError: unhashable), sources that do not pair with the scores (IndexError), and
    None or a number as the images to list (TypeError: not iterable) were raw exceptions."""
    import numpy as np
    from uadc.runtime import Detector, list_images
    det = Detector.load(int8_artifact[2].path, batch_size=np.int64(4))   # refused, while threads=np.int64 was taken
    assert det.batch_size == 4 and type(det.batch_size) is int
    for bad in (0, True, 2.0, "4"):
        with pytest.raises(UadcError, match="^batch_size: expected a whole number >= 1"):
            Detector.load(int8_artifact[2].path, batch_size=bad)
    with pytest.raises(UadcError, match=r"^category: expected a category's name or None, got list \['gray'\]"):
        det.thresholds(["gray"])
    size = det.manifest.preprocessing.image_size
    with pytest.raises(UadcError, match="^decide: 1 sources for 2 images$"):
        det.decide(np.zeros((2, size, size), np.float32), np.zeros(2, np.float32), sources=["a.png"])
    for bad, name in ((None, "NoneType"), (5, "int"), (["a", 3], "int")):
        with pytest.raises(UadcError, match=f"^images: expected a path or a list of paths, got {name} "):
            list_images(bad)


def test_a_stream_with_no_end_is_one_line_and_short_reads_are_whole_images(int8_artifact, tiny_data, monkeypatch):
    """`Detector.predict(open('/dev/zero', 'rb'))` read until the system killed the process (22 GB);
    a raw stream's read(n) returns fewer bytes than asked, and its image must still be whole."""
    from uadc.runtime import Detector
    det = Detector.load(int8_artifact[2].path)
    f = sorted((tiny_data / "gray" / "test" / "blob").glob("*.png"))[0]

    class Stream:
        def __init__(self, data: bytes | None, step: int):
            self.data, self.step = data, step

        def read(self, n=-1):
            if self.data is None:                   # no end
                return b"\0" * min(n, self.step)
            part, self.data = self.data[:min(n, self.step)], self.data[min(n, self.step):]
            return part

    assert det.predict(Stream(f.read_bytes(), 100)).score == pytest.approx(det.predict(f).score, abs=1e-6)
    monkeypatch.setattr(sys.modules["uadc.runtime.preprocess"], "MAX_STREAM_BYTES", 3 << 20)
    with pytest.raises(UadcError, match="^image stream: more than 3 MiB without an end"):
        det.predict(Stream(None, 1 << 20))


def test_overlays_of_an_input_folder_given_as_dotdot_stay_under_overlays(int8_artifact, tiny_data, tmp_path,
                                                                         monkeypatch):
    """`uadc predict ART .. --out .. --overlays` from inside cam/stripes/ labelled the input folder '..':
    its overlays went to overlays/../stripes/a.png, over the input images themselves (exit 0)."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    cam = tmp_path / "cam"
    (cam / "stripes").mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_data / "stripes" / "test").rglob("*.png"))[:2]):
        (cam / "stripes" / f"{i}.png").write_bytes(src.read_bytes())
    before = {p: p.read_bytes() for p in (cam / "stripes").iterdir()}
    monkeypatch.chdir(cam / "stripes")
    run = predict_paths(det, [Path("..")], out=Path(".."), overlays=True)
    assert {p: p.read_bytes() for p in (cam / "stripes").iterdir()} == before
    assert sorted(r["overlay"] for r in run.records) == ["overlays/cam/stripes/0.png", "overlays/cam/stripes/1.png"]
    assert all((cam / r["overlay"]).is_file() for r in run.records)


def test_overlays_of_inputs_given_with_dotdot_beside_other_inputs_stay_distinct_and_inside(int8_artifact, tiny_data,
                                                                                           tmp_path, monkeypatch):
    """`uadc predict ART . ../good --overlays` labelled ../good's files by the input `.` (a parent as text):
    overlays/blob/../good/... was refused, or written outside --out; `a x/b a/../b` gave x/b's and
    a/../b's images one overlay file between them (exit 0)."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    src = sorted((tiny_data / "stripes" / "test").rglob("*.png"))
    for i, folder in enumerate(["t/blob", "t/good", "a", "x/b", "b"]):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "0.png").write_bytes(src[i].read_bytes())
    monkeypatch.chdir(tmp_path / "t" / "blob")
    run = predict_paths(det, [Path("."), Path("../good")], out=tmp_path / "o1", overlays=True)
    assert sorted(r["overlay"] for r in run.records) == ["overlays/blob/0.png", "overlays/good/0.png"]
    monkeypatch.chdir(tmp_path)
    run = predict_paths(det, [Path("a"), Path("x/b"), Path("a/../b")], out=tmp_path / "o2", overlays=True)
    named = [r["overlay"] for r in run.records]
    assert len(set(named)) == 3 and not any(".." in o for o in named), named
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["a", "b", "o1", "o2", "t", "x"]


def test_an_earlier_runs_overlays_predicted_into_the_same_out_are_refused(int8_artifact, tiny_data, tmp_path):
    """`uadc predict ART o/overlays --out o --overlays` deleted its own input images as stale overlays (exit 0)."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    predict_paths(det, [tiny_data / "stripes" / "test"], out=tmp_path / "o", overlays=True)
    before = sorted((tmp_path / "o" / "overlays").rglob("*.png"))
    with pytest.raises(UadcError, match=r"/overlays, which this run rewrites; give another --out \(nothing was"):
        predict_paths(det, [tmp_path / "o" / "overlays"], out=tmp_path / "o", overlays=True)
    assert sorted((tmp_path / "o" / "overlays").rglob("*.png")) == before and before


def test_an_image_named_as_a_folder_of_images_gets_its_own_overlay(int8_artifact, tiny_data, tmp_path):
    """`x.jpg` beside a folder `x.png/` took overlays/cam/x.png as a file; the folder's overlays then
    failed to write, after every image had run (exit 2, no tables)."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    cam = tmp_path / "cam"
    (cam / "x.png").mkdir(parents=True)
    src = sorted((tiny_data / "stripes" / "test").rglob("*.png"))[:2]
    (cam / "x.bmp").write_bytes(src[0].read_bytes())   # a PNG under another suffix is read as what it is
    (cam / "x.png" / "y.png").write_bytes(src[1].read_bytes())
    run = predict_paths(det, [cam], out=tmp_path / "p", overlays=True)
    assert sorted(r["overlay"] for r in run.records) == ["overlays/cam/x-2.png", "overlays/cam/x.png/y.png"]
    assert all((tmp_path / "p" / r["overlay"]).is_file() for r in run.records) and not run.failed


def test_an_earlier_overlay_that_cannot_be_removed_is_refused_before_the_tables_change(int8_artifact, tiny_data,
                                                                                       tmp_path, monkeypatch):
    """An earlier run's overlay in a folder the user cannot change: the run replaced the tables and the
    overlays, then failed removing the old ones (exit 2): two runs mixed, reported as a failure."""
    import os
    from uadc.runtime import Detector, batch
    det = Detector.load(int8_artifact[2].path)
    out, test = tmp_path / "p", tiny_data / "gray" / "test"
    batch.predict_paths(det, [test / "good"], out=out, overlays=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    locked = out / "overlays" / "good"       # root ignores a chmod: the system's answer is simulated
    real = os.access
    monkeypatch.setattr(batch.os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    with pytest.raises(UadcError, match=r"cannot remove the earlier run's overlays in .*overlays/good \(folder is not "
                                        r"writable: .*\); choose another --out \(nothing was changed\)"):
        batch.predict_paths(det, [test], out=out, overlays=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_overlay_folder_that_cannot_be_written_is_refused_before_any_image_runs(int8_artifact, tiny_data,
                                                                                  tmp_path, monkeypatch):
    """A subfolder of overlays/ the user cannot write: the overlays sorted before it moved in, then the run
    failed naming overlays/, with no tables naming the ones it had moved."""
    import os
    from uadc.runtime import Detector, batch
    det = Detector.load(int8_artifact[2].path)
    out, test = tmp_path / "p", tiny_data / "gray" / "test"
    locked = out / "overlays" / "test" / "good"
    locked.mkdir(parents=True)
    real = os.access         # root ignores a chmod: the system's answer is simulated
    monkeypatch.setattr(batch.os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    ran = []
    monkeypatch.setattr(det, "run", lambda *a, **k: ran.append(1))
    with pytest.raises(UadcError, match=r"cannot write overlays into .*overlays/test/good \(folder is not writable: "
                                        r".*\); choose another --out \(nothing was changed\)"):
        batch.predict_paths(det, [test], out=out, overlays=True)
    assert not ran and sorted(out.rglob("*")) == [out / "overlays", locked.parent, locked]


def test_an_out_folder_with_a_newline_is_named_on_one_line(int8_artifact, tiny_data, tmp_path):
    """`uadc predict --out 'a<newline>b'` printed its `written:` line raw: a log reader saw two lines."""
    from click.testing import CliRunner
    from uadc.cli import main
    out = tmp_path / "a\nb"
    r = CliRunner().invoke(main, ["predict", str(int8_artifact[2].path), str(tiny_data / "gray" / "test" / "good"),
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    written = [line for line in r.output.splitlines() if line.startswith("written:")]
    assert len(written) == 1 and "a\\x0ab/predictions.jsonl" in written[0]
    assert (out / "predictions.jsonl").is_file()


def test_an_out_folder_through_a_missing_folder_and_dotdot_is_refused(int8_artifact, tiny_data, tmp_path):
    """`predict --out mine/x/..` (x missing): the check of what is there looked at nothing, then the writer
    made x/ and replaced the user's own predictions.jsonl in mine/."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.jsonl").write_text("my own notes\n")
    with pytest.raises(UadcError, match=r"'\.\.' follows .*mine/x, which is no folder"):
        predict_paths(Detector.load(int8_artifact[2].path), [tiny_data / "gray" / "test" / "good"], out=mine / "x" / "..")
    assert (mine / "predictions.jsonl").read_text() == "my own notes\n" and not (mine / "x").exists()


def test_a_closed_detector_ends_its_threads_and_refuses_to_run(int8_artifact, tiny_data):
    """close() / ``with`` end the worker threads of the ONNX Runtime schedule (they outlived every
    Detector before); a run after it is one line, not the pool's RuntimeError."""
    import threading
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    f = sorted((tiny_data / "gray" / "test" / "blob").glob("*.png"))[0]
    before = set(threading.enumerate())
    with Detector.load(res.path, threads=2, schedule="batch") as det:
        det.predict([f, f, f], category="gray")
        assert det.backend.session._pool is not None or det.backend.session.threads == 1   # a worker split the batch
    assert det.closed and set(threading.enumerate()) <= before
    with pytest.raises(UadcError, match=r"this Detector was closed; load the artifact again$"):
        det.predict(f, category="gray")
    with pytest.raises(UadcError, match="was closed"):
        det.run(np.zeros((1, 3, 64, 64), np.float32))
    det.close()   # twice is no error


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: POSIX only")
@pytest.mark.parametrize("schedule", ["branches", "batch"])
def test_a_warm_detector_runs_in_a_forked_child(int8_artifact, tiny_data, schedule):
    """A server that loads the model before forking its workers (gunicorn --preload): the child's copy of
    the worker pool had no threads, so its first predict waited for ever."""
    import signal
    from uadc.backends.parallel import available_cores
    from uadc.runtime import Detector
    if available_cores() < 2:
        pytest.skip("one core: the schedule runs without a worker pool")
    _, _, res = int8_artifact
    f = sorted((tiny_data / "gray" / "test" / "blob").glob("*.png"))[0]
    with Detector.load(res.path, threads=2, schedule=schedule) as det:
        want = det.predict([f, f], category="gray")[0].score   # warm: the pool's thread exists
        pid = os.fork()
        if pid == 0:   # the child: a hang ends it by SIGALRM, a wrong score by exit 1
            signal.alarm(60)
            try:
                os._exit(0 if det.predict([f, f], category="gray")[0].score == want else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_a_detector_closed_while_another_thread_runs_it_says_so(int8_artifact, tiny_data, monkeypatch):
    """close() from one thread while another predicts: the run failed with the dead pool's error, read as
    'ONNX Runtime failed to run the model' (or, on OpenVINO, a TypeError traceback)."""
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    f = sorted((tiny_data / "gray" / "test" / "blob").glob("*.png"))[0]
    det = Detector.load(res.path, threads=2, schedule="branches")
    session = det.backend.session
    if session._pool is None:
        pytest.skip("one core: the schedule runs without a worker pool")
    plan = session.plan

    def closed_meanwhile(batch):   # the other thread's close lands after this call planned its work
        how = plan(batch)
        det.close()
        return how
    monkeypatch.setattr(session, "plan", closed_meanwhile)
    with pytest.raises(UadcError, match=r"this Detector was closed; load the artifact again$"):
        det.predict(f, category="gray")


def test_a_broken_link_as_out_is_refused_before_any_image_runs(int8_artifact, tiny_data, tmp_path, monkeypatch):
    """It was refused after every image had run, leaving a lock file beside it."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    _, _, res = int8_artifact
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with Detector.load(res.path) as det:
        monkeypatch.setattr(det, "run", lambda *a: pytest.fail("an image ran"))
        with pytest.raises(UadcError, match=r"cannot create folder .*out: it is a broken link"):
            predict_paths(det, [tiny_data / "gray" / "test"], out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_16_bit_image_is_read_in_integers():
    """16-bit pixels went through float64 (about 25 bytes a pixel at the peak): a 364 KB PNG of 13300^2
    constant pixels took 4.6 GB. The same 8-bit values (round(v / 257)) in a fraction of the memory."""
    import tracemalloc
    from PIL import Image
    from uadc.core.images import eight_bit
    ramp = Image.frombytes("I;16", (256, 256), np.arange(65536, dtype="<u2").tobytes())
    want = np.round(np.arange(65536) / 257.0).astype(np.uint8).reshape(256, 256)
    assert np.array_equal(np.asarray(eight_bit(ramp, "ramp")), want)
    big = Image.frombytes("I;16", (2000, 2000), np.full(4_000_000, 40000, "<u2").tobytes())
    tracemalloc.start()
    try:
        out = eight_bit(big, "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.asarray(out).max() == 156 and peak < 8 * 4_000_000, peak   # uint32 work array: 4 bytes a pixel


def test_a_kept_prediction_holds_its_own_map_not_its_batch(int8_artifact, tiny_data):
    """Prediction.anomaly_map / .mask were views of the batch's arrays: a service that kept one result kept
    every map of its batch alive."""
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    files = sorted((tiny_data / "gray" / "test").rglob("*.png"))[:4]
    with Detector.load(res.path) as det:
        preds = det.predict(files, category="gray")
        again = det.predict(files, category="gray")
    assert len(preds) == 4
    assert all(p.anomaly_map.base is None and p.mask.base is None for p in preds)
    # two predictions of one image compared equal: "The truth value of an array ... is ambiguous"
    for p in again:
        p.latency_ms = 0.0
    for p in preds:
        p.latency_ms = 0.0
    assert preds == again and preds[1] in again and preds[0] != preds[1] and preds[0] != "x"
    import pickle
    assert pickle.loads(pickle.dumps(preds[0])) == preds[0]
    with pytest.raises(UadcError, match=r"a Detector cannot be pickled \(it holds runtime sessions\): pass its "
                                        r"artifact folder"):   # TypeError: cannot pickle 'onnxruntime...' object
        pickle.dumps(det)


def test_an_out_folder_under_a_folder_the_user_cannot_write_holds_its_own_lock(int8_artifact, tiny_data, tmp_path,
                                                                              monkeypatch):
    """A service's writable /srv/qc/line1 under a root-owned /srv/qc: `--out /srv/qc/line1` was refused
    ("folder is not writable: /srv/qc"), since the lock went beside the folder."""
    from uadc.core import io
    from uadc.runtime import Detector, batch
    parent = tmp_path / "srv"
    out = parent / "line1"
    out.mkdir(parents=True)
    real = io.check_writable

    def root_owned(folder):   # root ignores a chmod: the system's answer is simulated
        if Path(os.path.realpath(folder)) == Path(os.path.realpath(parent)):
            raise UadcError(f"folder is not writable: {parent}")
        return real(folder)
    monkeypatch.setattr(io, "check_writable", root_owned)
    with Detector.load(int8_artifact[2].path) as det:
        run = batch.predict_paths(det, [tiny_data / "gray" / "test" / "good"], out=out)
    assert run.records and (out / "predictions.jsonl").is_file() and (out / ".uadc.lock").is_file()
    assert sorted(p.name for p in parent.iterdir()) == ["line1"]
    with pytest.raises(UadcError, match="folder is not writable"):   # a new folder there still needs the parent
        batch.predict_paths(Detector.load(int8_artifact[2].path), [tiny_data / "gray" / "test" / "good"],
                            out=parent / "line2")


def test_a_broken_openvino_install_is_named_as_such(int8_artifact, monkeypatch):
    """An openvino that is installed and fails to import (a missing shared library) said "pip install
    'uadc[openvino]'", while compile gave the real reason."""
    from uadc.backends import openvino as ov
    from uadc.runtime import Detector
    monkeypatch.setattr(ov, "import_error", lambda: "OpenVINO does not import here: ImportError: libopenvino.so")
    with pytest.raises(UadcError, match=r"does not import here \(OpenVINO does not import here: ImportError: libopenvino"):
        Detector.load(int8_artifact[2].path, backend="openvino")


def test_tensorrt_batches_above_the_engines_profile_run_in_its_batches():
    """`uadc predict --batch-size 16` on an engine built for at most 8 images: each chunk must be copied as it comes,
    since Polygraphy's runner reuses its output buffers (every chunk but the last took the last one's scores)."""
    from uadc.runtime.detector import _TrtBackend

    class Reusing:   # one output buffer per name, rewritten by every call, as TrtRunner.infer does
        is_active = True

        def __init__(self):
            self.buf = {"anomaly_map": np.zeros((4, 1, 2, 2), np.float32), "score": np.zeros(4, np.float32)}

        def infer(self, feed):
            x = feed["images"]
            assert len(x) <= 4, "above the engine's profile"
            self.buf["anomaly_map"][:len(x)] = x[:, :1]
            self.buf["score"][:len(x)] = x.reshape(len(x), -1).max(1)
            return {k: v[:len(x)] for k, v in self.buf.items()}

    backend = _TrtBackend.__new__(_TrtBackend)
    backend.runner, backend.max_batch = Reusing(), 4
    images = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((10, 3, 2, 2), np.float32)
    maps, scores = backend.run(images, "images")
    assert scores.tolist() == list(range(10)) and maps[:, 0, 0].tolist() == list(range(10))


def test_an_engine_built_from_another_model_is_refused(int8_artifact, tmp_path, monkeypatch, caplog):
    """A new artifact's files copied over a device folder that kept its model.engine: the old engine ran with the
    new thresholds, without a word. build_engine.sh records the sha256 of the model.onnx it built from."""
    import hashlib
    import subprocess
    from types import SimpleNamespace

    from uadc.backends.tensorrt.bundle import _render_script
    from uadc.runtime import Detector, detector
    art = tmp_path / "art"
    shutil.copytree(int8_artifact[2].path, art)
    (art / "model.engine").write_bytes(b"engine")
    monkeypatch.setattr(detector, "_check_importable", lambda module, how: None)
    monkeypatch.setattr(detector, "_check_precision", lambda *a, **k: None)
    monkeypatch.setattr(detector, "_TrtBackend", lambda engine: SimpleNamespace(name="tensorrt", close=lambda: None))
    with caplog.at_level("WARNING"):
        det = Detector.load(art, backend="tensorrt")   # built by hand: nothing says from what
    assert any("nothing records which model.onnx it was built from" in w for w in det.warnings), det.warnings
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "trtexec").write_text("#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v100300]'\n"
                                   '[ "$1" = --help ] && exit 0\n[ -n "$FAIL" ] && exit 1\n'   # FAIL=1: the build fails
                                   'echo engine > model.engine\n')
    (tools / "trtexec").chmod(0o755)
    (art / "build_engine.sh").write_text(_render_script("model.onnx", "model.engine", None, (8, 5, 0),
                                                        {10: ["--onnx=model.onnx"]}))
    run = subprocess.run(["bash", str(art / "build_engine.sh")], env=dict(os.environ, TRTEXEC=str(tools / "trtexec")),
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    sha = hashlib.sha256((art / "model.onnx").read_bytes()).hexdigest()
    assert (art / "model.engine.onnx.sha256").read_text() == sha + "\n"
    assert not Detector.load(art, backend="tensorrt").warnings
    (art / "model.engine.onnx.sha256").write_text("0" * 64 + "\n")   # the engine of the artifact compiled before
    with pytest.raises(UadcError, match=r"model.engine was built from another model.onnx \(sha256 000000000000, this "
                                        rf"artifact's is {sha[:12]}\): rerun build_engine.sh on this device"):
        Detector.load(art, backend="tensorrt")
    # a rebuild that fails leaves no engine of the model before (it ran, with a warning only, once its record was gone)
    failed = subprocess.run(["bash", str(art / "build_engine.sh")], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, TRTEXEC=str(tools / "trtexec"), FAIL="1"))
    assert failed.returncode == 1 and not (art / "model.engine").exists()
    with pytest.raises(UadcError, match="has no TensorRT engine"):   # the ONNX Runtime artifact this test borrows
        Detector.load(art, backend="tensorrt")


def test_an_engine_compile_built_and_the_device_rebuilt_is_checked_by_its_record(int8_artifact, tmp_path, monkeypatch):
    """`compile --build-engine` listed model.engine and timing.cache with their hashes in artifact.json: once the
    documented build_engine.sh rebuilt the engine on the device, every load of the artifact (ONNX Runtime's too)
    and its bundle were refused as 'changed after compile'."""
    import hashlib

    import uadc
    from uadc.core.manifest import read_manifest, write_manifest
    from uadc.runtime import Detector
    art = tmp_path / "art"
    shutil.copytree(int8_artifact[2].path, art)
    (art / "model.engine").write_bytes(b"built at compile")
    (art / "timing.cache").write_bytes(b"timings")
    write_manifest(art, read_manifest(art, verify=False))   # as compile --build-engine leaves the folder
    files = read_manifest(art).files
    assert "model.engine" in files and "timing.cache" not in files   # the engine goes with a bundle; timings stay
    (art / "model.engine.onnx.sha256").write_text("0" * 64 + "\n")   # an older engine's record left beside it
    assert read_manifest(art).check_engine(art / "model.engine") is None   # the listed engine, unchanged, runs
    (art / "model.engine").write_bytes(b"rebuilt on the device")       # build_engine.sh: a new engine, its record
    (art / "timing.cache").write_bytes(b"new timings")
    (art / "model.engine.onnx.sha256").write_text(hashlib.sha256((art / "model.onnx").read_bytes()).hexdigest() + "\n")
    Detector.load(art, backend="onnxruntime").close()
    import sys
    import types
    from uadc.pipeline.verify import artifact_runner
    from uadc.backends.tensorrt.plan import trt_available
    trt_available.cache_clear()   # its answer is cached: a GPU machine's would stand
    try:
        with monkeypatch.context() as m:   # an empty tensorrt/ on the path: verify ran the engine (no Runtime)
            m.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
            assert artifact_runner(art, "B")[1] == "onnxruntime CPU"
    finally:
        trt_available.cache_clear()
    line = uadc.bundle(art, tmp_path / "line")   # the device's engine is not the artifact's: left out, said so
    assert "model.engine" not in line.files and "model.engine" in line.left_out and "model.engine" not in line.unlisted
    assert line.source_bytes == sum((art / f).stat().st_size for f in [*line.files, *line.left_out, "artifact.json"]
                                    if f != "model.engine")
    assert "model.engine" not in read_manifest(line.path).files
    for record in ("", None):   # changed, and nothing says the device built it (an empty record says nothing)
        if record is None:
            (art / "model.engine.onnx.sha256").unlink()
        else:
            (art / "model.engine.onnx.sha256").write_text(record)
        with pytest.raises(UadcError, match="model.engine does not match its sha256 in artifact.json"):
            read_manifest(art)


def test_a_category_taken_from_the_folder_predict_runs_in_is_said(int8_artifact, tiny_data, tmp_path, monkeypatch,
                                                                   caplog):
    """`cd gray; uadc predict ART cam1` judged cam1's images at gray's thresholds without a word (a project folder
    named like a product); `uadc predict ART .` inside gray/test is judged as gray, as before, and said so too."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    shutil.copytree(tiny_data / "gray" / "test" / "blob", tmp_path / "gray" / "cam1")
    monkeypatch.chdir(tmp_path / "gray")
    with caplog.at_level("WARNING", logger="uadc"):
        run = predict_paths(det, [Path("cam1")])
    n = len(run.records)
    assert n and {r["category"] for r in run.records} == {"gray"}
    assert f"{n} images judged as gray: taken from a folder above the inputs given" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        predict_paths(det, [tmp_path / "gray" / "cam1"])   # named in the path: nothing to say
    assert "taken from a folder above" not in caplog.text
    import uadc   # verify --images takes it so too, and says so in a note
    notes = uadc.verify(int8_artifact[2].path, images=[Path("cam1")]).notes
    assert any("images take their category from a folder above the path given" in n for n in notes), notes


def test_an_image_gone_after_scoring_keeps_its_overlay_and_a_long_row_is_still_ours(int8_artifact, tiny_data, tmp_path):
    """--overlays read each image again after scoring: a camera folder's rotating buffer deleting a frame meanwhile
    failed the whole run (exit 2, no tables). A rerun into an --out whose first row was longer than 4 KB (long
    non-ASCII paths, escaped six characters each) was refused as "not written by uadc predict"."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    det = Detector.load(int8_artifact[2].path)
    live = tmp_path.joinpath("live", *["検査画像第一ライン" * 9] * 6)   # 243 bytes a folder, a system's limit 255
    live.mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_data / "stripes" / "test").rglob("*.png"))[:2]):
        (live / f"{i}.png").write_bytes(src.read_bytes())
    scored = det.run

    def run_then_rotate(images):
        out = scored(images)
        (live / "1.png").unlink(missing_ok=True)   # the camera's buffer moves on
        return out
    det.run = run_then_rotate
    out = tmp_path / "p"
    run = predict_paths(det, [tmp_path / "live"], out=out, overlays=True, category="stripes")
    assert len(run.records) == 2 and not run.failed and all((out / r["overlay"]).is_file() for r in run.records)
    assert len((out / "predictions.jsonl").read_text().split("\n", 1)[0]) > 4096
    (live / "1.png").write_bytes((live / "0.png").read_bytes())
    again = predict_paths(det, [tmp_path / "live"], out=out, overlays=True, category="stripes")
    assert len(again.records) == 2


def test_only_png_jpeg_bmp_and_tiff_bytes_are_decoded_whatever_the_name(tmp_path):
    """A PostScript file named part.png was handed to Ghostscript (a `gs` on PATH ran; its -dSAFER has been
    bypassed before), and GIF / WebP bytes named .png were read though uadc does not read those types."""
    from uadc.core.errors import UadcError
    from uadc.core.images import open_image
    (tmp_path / "part.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "gif.png", "GIF")
    for name in ("part.png", "gif.png"):
        with pytest.raises(UadcError, match=rf"^unreadable image {tmp_path}/{name}: not a PNG, JPEG, BMP or TIFF image"):
            with open_image(tmp_path / name):
                pass
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:12])   # a damaged PNG is said so, not "another format"
    (tmp_path / "empty.png").write_bytes(b"")
    for name, said in (("cut.png", "damaged or cut short"), ("empty.png", "an empty file")):
        with pytest.raises(UadcError, match=rf"^unreadable image {tmp_path}/{name}: {said}"):
            with open_image(tmp_path / name):
                pass
    import io   # bytes of a PNG's signature only: Pillow's probe had read them, "an empty file" was said
    for data, said in ((good.read_bytes()[:8], "damaged or cut short"), (b"hello", "not a PNG"), (b"", "an empty")):
        with pytest.raises(UadcError, match=rf"^unreadable image bytes: {said}"):
            with open_image(io.BytesIO(data), "image bytes"):
                pass
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):   # each named .png: the bytes decide, among these
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "ok.png", fmt)
        with open_image(tmp_path / "ok.png") as im:
            assert im.size == (8, 8)


def test_a_truncated_image_is_unreadable_in_every_format(tmp_path):
    """A cut JPEG, BMP or TIFF said `image P: cannot read its pixels (...)` where a cut PNG and training said
    `unreadable image P: ...`, the words README promises a grep of the tables finds."""
    from uadc.core.errors import UadcError
    from uadc.core.manifest import Preprocessing
    from uadc.runtime.preprocess import load_rgb
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8))
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    for fmt, ext in (("JPEG", "jpg"), ("BMP", "bmp"), ("TIFF", "tif"), ("PNG", "png")):
        whole = tmp_path / f"whole.{ext}"
        pixels.save(whole, fmt)
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * 0.6)])
        for source, said in ((cut, f"unreadable image {cut}: "), (cut.read_bytes(), "unreadable image bytes: ")):
            with pytest.raises(UadcError) as e:
                load_rgb(source, pre)
            assert str(e.value).startswith(said), (fmt, str(e.value))
