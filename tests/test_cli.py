"""The CLI's contract for user mistakes: one line, exit code 2, no traceback, nothing written."""

import json
import os
import shutil

import pytest
import yaml
from click.testing import CliRunner

from uadc.cli import main


def _assert_user_error(result, text, artifacts):
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert out.startswith("error: ") and text in out
    assert len(out.splitlines()) == 1 and "Traceback" not in out
    assert not artifacts.exists() or not any(artifacts.rglob("*"))


def test_bad_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"sources": [{"root": "x"}]}, "model": {"backbone": "resnet19"}}))
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["train", str(bad), "--artifacts", str(art)])
    _assert_user_error(res, "model.backbone: 'resnet19' is not one of", art)


def test_missing_data_folder(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"data": {"sources": [{"root": "nowhere", "categories": ["a"]}]}}))
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["train", str(r), "--artifacts", str(art)])
    _assert_user_error(res, "data folder not found", art)


def test_defect_without_mask(recipe_factory, tiny_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "gray" / "ground_truth" / "blob" / "002_mask.png").unlink()
    r = recipe_factory(data={"sources": [{"root": str(data), "categories": ["stripes", "gray"]}]})
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["train", str(r), "--artifacts", str(art)])
    _assert_user_error(res, "defect image without mask", art)


def test_training_never_overwrites_the_recipe_file_it_reads(tiny_data, tmp_path):
    """An artifacts folder holding the user's own recipe at <artifacts>/<name>/recipe.yaml: training
    refuses before any work instead of replacing the file (comments and all) with uadc's copy."""
    from conftest import write_recipe
    (tmp_path / "exp1").mkdir()
    own = write_recipe(tmp_path / "exp1" / "recipe.yaml", tiny_data)
    text = "# my notes\nname: exp1\n" + own.read_text()
    own.write_text(text)
    res = CliRunner().invoke(main, ["train", str(own), "--artifacts", str(tmp_path)])
    assert res.exit_code == 2 and "would overwrite the recipe file itself" in res.output, res.output
    assert own.read_text() == text and sorted(p.name for p in own.parent.iterdir()) == ["recipe.yaml"]
    # --artifacts in the recipe's data or in an artifact folder: trained, exit 0, then every compile refused it
    good = tiny_data / "gray" / "train" / "good"
    (tmp_path / "art" / "exp1").mkdir(parents=True)
    (tmp_path / "art" / "exp1" / "artifact.json").write_text("{}")
    for arts, said in ((good / "arts", "inside the recipe's data folder"), (tmp_path / "art", "inside the artifact folder")):
        res = CliRunner().invoke(main, ["train", str(write_recipe(tmp_path / "r.yaml", tiny_data)), "--artifacts",
                                        str(arts if "data" in said else tmp_path / "art" / "exp1")])
        assert res.exit_code == 2 and "--artifacts " in res.output and said in res.output, res.output
    assert not (good / "arts").exists()


def test_eval_of_a_one_class_checkpoint_keeps_the_unified_eval_json(recipe_factory, tmp_path, monkeypatch):
    """`uadc eval --checkpoint one_class/gray/checkpoint.pt` was titled "unified" and replaced the unified
    eval.json, which `eval --one-class` then compared against; `--one-class --checkpoint X` ignored X."""
    import json
    r, art = recipe_factory(train={"epochs": 1, "threads": 1}), tmp_path / "art"
    for args in (["train", str(r), "--one-class"], ["train", str(r)]):
        assert CliRunner().invoke(main, [*args, "--artifacts", str(art)]).exit_code == 0
        if "--one-class" in args:   # only one-class models yet: "checkpoint not found" named neither them nor --one-class
            res = CliRunner().invoke(main, ["eval", str(r), "--artifacts", str(art)])
            assert res.exit_code == 2 and "holds one-class models of gray, stripes: `uadc eval --one-class` judges " \
                                          "them" in res.output, res.output
    monkeypatch.chdir(tmp_path)   # a relative --artifacts: eval.json named the checkpoint relative to the cwd
    assert CliRunner().invoke(main, ["eval", str(r), "--artifacts", "art"]).exit_code == 0
    unified = (art / "tiny" / "eval.json").read_text()
    assert json.loads(unified)["checkpoint"] == str(art / "tiny" / "checkpoint.pt")
    res = CliRunner().invoke(main, ["eval", str(r), "--artifacts", str(art), "--checkpoint",
                                    str(art / "tiny" / "one_class" / "gray" / "checkpoint.pt")])
    assert res.exit_code == 0 and "tiny (one-class gray, 1 epoch)" in res.output and "not written" in res.output
    assert (art / "tiny" / "eval.json").read_text() == unified and "one_class" not in json.loads(unified)
    # judged on its own category only (it was scored on every category of the recipe, the mean too)
    assert "stripes" in json.loads(unified)["categories"] and "stripes" not in res.stdout.replace("category 'stripes' has", "")
    import uadc
    with pytest.raises(uadc.UadcError, match=r"one-class model of \['gray'\], the recipe covers .*a recipe whose "
                                             r"data.sources list only gray .*axes: \{one_class: \[true\]\}"):
        uadc.compile(art / "tiny" / "one_class" / "gray" / "checkpoint.pt", "ort-cpu-fp32", recipe=r,
                     artifacts=art, out=tmp_path / "oc")       # failed at the manifest after all the work
    assert not (tmp_path / "oc").exists()
    # the recipe copy beside a one-class checkpoint, compiled, silently built the unified model: it says so
    copy = (art / "tiny" / "one_class" / "gray" / "recipe.yaml").read_text()
    assert copy.startswith("# The recipe whose one-class model of 'gray' is checkpoint.pt here")
    assert not (art / "tiny" / "recipe.yaml").read_text().startswith("#")
    # another recipe's checkpoint is judged but not written as this recipe's eval.json (eval --one-class read it)
    other = recipe_factory("other", train={"epochs": 2, "threads": 1})
    assert CliRunner().invoke(main, ["train", str(other), "--artifacts", str(art)]).exit_code == 0
    res = CliRunner().invoke(main, ["eval", str(r), "--artifacts", str(art), "--checkpoint",
                                    str(art / "other" / "checkpoint.pt")])
    assert res.exit_code == 0 and "not written" in res.output and (art / "tiny" / "eval.json").read_text() == unified
    res = CliRunner().invoke(main, ["eval", str(r), "--one-class", "--artifacts", str(art), "--checkpoint", "nope.pt"])
    _assert_user_error(res, "drop --checkpoint", tmp_path / "none")
    res = CliRunner().invoke(main, ["eval", str(r), "--one-class", "--artifacts", str(art)])
    assert res.exit_code == 0 and "unified" in res.output and "no unified eval.json" not in res.output
    # retrained: the eval.json of the model it replaced is no basis for the comparison (it was compared)
    assert CliRunner().invoke(main, ["train", str(r), "--artifacts", str(art), "--epochs", "2"]).exit_code == 0
    res = CliRunner().invoke(main, ["eval", str(r), "--one-class", "--artifacts", str(art)])
    assert res.exit_code == 0 and "no unified eval.json of this recipe's current checkpoint" in res.output
    assert f"written: {art / 'tiny' / 'one_class_eval.json'}" in res.output   # as eval says of eval.json
    # which models were judged is recorded (a partial retrain mixed models, unseen); write=False wrote all the same
    written = art / "tiny" / "one_class_eval.json"
    models = json.loads(written.read_text())["one_class"]["models"]
    assert sorted(models) == ["gray", "stripes"] and all(len(m["checkpoint_sha256"]) == 64 for m in models.values())
    # per defect type too, as README says of an EvalResult (the one-class figures had none)
    defects = json.loads(written.read_text())["one_class"]["defects"]
    assert sorted(defects) == ["gray", "stripes"] and all(d and all("count" in x for x in d.values())
                                                           for d in defects.values())
    written.unlink()
    assert uadc.evaluate(r, one_class=True, artifacts=art, write=False).path is None and not written.exists()
    kept = (art / "tiny" / "eval.json").rename(tmp_path / "eval.json")   # --no-write: e.g. a read-only artifacts folder
    for extra in ([], ["--one-class"]):
        res = CliRunner().invoke(main, ["eval", str(r), *extra, "--no-write", "--artifacts", str(art)])
        assert res.exit_code == 0 and not written.exists() and not (art / "tiny" / "eval.json").exists(), res.output
        assert "not written (--no-write)" in res.output
    kept.rename(art / "tiny" / "eval.json")
    with pytest.raises(uadc.UadcError, match=r"one_class takes the recipe alone"):   # the first was ignored
        uadc.evaluate(other, r, one_class=True, artifacts=art)
    gray = art / "tiny" / "one_class" / "gray" / "checkpoint.pt"    # another category's, or the unified, model
    for wrong, said in ((art / "tiny" / "one_class" / "stripes" / "checkpoint.pt", "a one-class model of stripes"),
                        (art / "tiny" / "checkpoint.pt", "a unified model of stripes, gray")):
        shutil.copy(wrong, gray)
        res = CliRunner().invoke(main, ["eval", str(r), "--one-class", "--artifacts", str(art)])
        assert res.exit_code == 2 and res.output.splitlines()[-1].endswith(
            f"not the one-class model of 'gray' ({said}); retrain with `uadc train --one-class`"), res.output


def test_eval_without_checkpoint(recipe_factory, tmp_path):
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["eval", str(recipe_factory()), "--artifacts", str(art)])
    _assert_user_error(res, "checkpoint not found", art)


def test_unknown_target_and_calibrator(recipe_factory, tmp_path):
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["compile", str(recipe_factory()), "--target", "tpu", "--artifacts", str(art),
                                    "--checkpoint", str(tmp_path / "none.pt")])
    assert res.exit_code == 2 and "error: " in res.output


def test_check_trt_missing_file(tmp_path):
    res = CliRunner().invoke(main, ["check-trt", str(tmp_path / "nope.onnx")])
    assert res.exit_code == 2 and "model not found" in res.output
    res = CliRunner().invoke(main, ["check-trt", str(tmp_path / "nope.onnx"), "--json"])   # one document, as every --json
    assert res.exit_code == 2 and json.loads(res.stdout) == {"error": res.stderr.strip()[len("error: "):], "exit_code": 2}


def test_recipe_schema_lists_keys():
    res = CliRunner().invoke(main, ["recipe-schema"])
    assert res.exit_code == 0 and "model.method" in res.output and "compile.calib_data" in res.output


def test_calibrators_list():
    res = CliRunner().invoke(main, ["calibrators", "list"])
    assert res.exit_code == 0 and set(res.output.split()) >= {"entropy", "mse", "minmax", "percentile"}


def test_eval_every_shows_the_learning_curve_on_the_epoch_lines(recipe_factory, tmp_path):
    """`--eval-every N` recorded test AUROC in the checkpoint history but the epoch lines did not show it."""
    import torch
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["train", str(recipe_factory(train={"epochs": 3, "threads": 1})),
                                    "--eval-every", "2", "--artifacts", str(art)])
    assert res.exit_code == 0, res.output
    assert res.output.count("checkpoint written") == 1      # logged by the library and printed by the CLI before
    lines = [ln for ln in res.output.splitlines() if ln.startswith("train unified: epoch ")]
    history = torch.load(art / "tiny" / "checkpoint.pt", weights_only=True)["history"]
    assert len(lines) == 3 and [("test" in h) for h in history] == [False, True, True]   # and the last epoch
    assert "test AUROC" not in lines[0]
    for line, h in zip(lines[1:], history[1:]):
        mean = h["test"]["mean"]
        assert line.endswith(f"test AUROC image {mean['image_auroc']:.4f}, pixel {mean['pixel_auroc']:.4f}")


def test_compile_after_one_class_training_names_what_compiles_them(recipe_factory, tmp_path):
    """It said only "run `uadc train`", as if the one-class checkpoints beside it were not there."""
    r, art = recipe_factory(train={"epochs": 1, "threads": 1}), tmp_path / "art"
    assert CliRunner().invoke(main, ["train", str(r), "--one-class", "--artifacts", str(art)]).exit_code == 0
    res = CliRunner().invoke(main, ["compile", str(r), "--target", "ort-cpu-fp32", "--artifacts", str(art)])
    assert res.exit_code == 2 and "one-class models of gray, stripes, which do not compile from this recipe" in res.output
    assert "axes: {one_class: [true]}" in res.output and not (art / "tiny" / "ort-cpu-fp32").exists(), res.output
    assert f"run `uadc train {r} --artifacts {art}` first" in res.output   # it trained into ./artifacts
    (tmp_path / "afile").write_text("")
    res = CliRunner().invoke(main, ["compile", str(r), "--artifacts", str(tmp_path / "afile")])
    assert res.exit_code == 2 and res.output.strip() == f"error: artifacts: not a folder: {tmp_path / 'afile'}"
    # given to a one-category recipe, it said "retrain with `uadc train --one-class`", which compiles nothing either
    import yaml
    cfg = yaml.safe_load(r.read_text())
    cfg["data"]["sources"][0]["categories"] = ["gray"]
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "one.yaml"), "--target", "ort-cpu-fp32", "--checkpoint",
                                    str(art / "tiny" / "one_class" / "gray" / "checkpoint.pt"), "--artifacts", str(art)])
    assert res.exit_code == 2 and res.output.rstrip().endswith(
        "retrain with `uadc train` (a one-class checkpoint is judged by `uadc eval --one-class` of the recipe that "
        "trained it)"), res.output
    cfg["model"] = {**cfg.get("model", {}), "smoothing_sigma": 2.0}   # eval --one-class said "retrain with `uadc train`"
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump({**cfg, "name": "tiny", "data": yaml.safe_load(r.read_text())["data"]}))
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "changed.yaml"), "--one-class", "--artifacts", str(art)])
    assert res.exit_code == 2 and res.output.rstrip().endswith("retrain with `uadc train --one-class`"), res.output


def test_one_class_epoch_lines_name_their_category(recipe_factory, tmp_path):
    """One-class training printed "epoch 1/1 ..." for every category: which model's loss was it?"""
    res = CliRunner().invoke(main, ["train", str(recipe_factory()), "--one-class", "--artifacts", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    epochs = [ln.split(":")[0] for ln in res.output.splitlines() if ": epoch 1/" in ln]
    assert epochs == ["train stripes", "train gray"], res.output


def test_learning_curve_seconds_include_teacher_caching(recipe_factory, tmp_path, monkeypatch):
    """The learning curve's train_seconds summed the epochs only: the teacher-feature caching before
    the first epoch (minutes at 256 px) was missing, so it disagreed with the checkpoint's train_seconds."""
    import json
    import time
    from uadc.training import fit
    slow = fit.cache_teacher
    monkeypatch.setattr(fit, "cache_teacher", lambda *a: (time.sleep(0.6), slow(*a))[1])
    r, art = recipe_factory(train={"epochs": 1, "threads": 1}), tmp_path / "art"
    assert CliRunner().invoke(main, ["train", str(r), "--eval-every", "1", "--artifacts", str(art)]).exit_code == 0
    res = CliRunner().invoke(main, ["eval", str(r), "--artifacts", str(art)])
    assert res.exit_code == 0, res.output
    extra = json.loads((art / "tiny" / "eval.json").read_text())
    assert extra["learning_curve"][-1]["train_seconds"] >= 0.6 and extra["train_seconds"] >= 0.6
    # Uninformed Students' descriptor teacher, trained before epoch 1, was missing from the curve too
    from uadc.models.us import UninformedStudents
    pretrain = UninformedStudents.pretrain_teacher
    monkeypatch.setattr(UninformedStudents, "pretrain_teacher", lambda *a, **k: (time.sleep(0.6), pretrain(*a, **k))[1])
    us = recipe_factory("us", model={"method": "us", "taps": ["blocks.3"]}, train={"epochs": 1, "threads": 1})
    assert CliRunner().invoke(main, ["train", str(us), "--eval-every", "1", "--artifacts", str(art)]).exit_code == 0
    assert CliRunner().invoke(main, ["eval", str(us), "--artifacts", str(art)]).exit_code == 0
    extra = json.loads((art / "us" / "eval.json").read_text())
    assert extra["learning_curve"][-1]["train_seconds"] >= 0.6


def test_readme_command_synopsis_lists_every_option():
    """The README's "Commands" block lacked --artifacts everywhere, verify's --recipe / --normal-only /
    --markdown, qat's --compile: the synopsis is checked against the CLI itself."""
    import re
    from pathlib import Path
    import click
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("## Commands"):readme.index("### In a pipeline")]
    missing = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")
            return
        name = path[len("uadc "):]
        line = next((ln for ln in re.split(r"\nuadc | \| uadc ", block)
                     if ln.startswith(name + " ") or ln.strip() == name), None)
        assert line is not None, f"{path} is not in the README synopsis"
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                missing.extend(f"{path} {o}" for o in p.opts if o.startswith("--") and o not in line)
    walk(main, "uadc")
    assert missing == []


def test_a_checkpoint_path_that_cannot_be_written_fails_before_training(recipe_factory, tmp_path, monkeypatch):
    """A folder where checkpoint.pt goes: the whole training ran, then `cannot write ...: Is a directory`."""
    import uadc.training.run as run
    art = tmp_path / "art"
    (art / "tiny" / "checkpoint.pt").mkdir(parents=True)
    monkeypatch.setattr(run, "load_images", lambda *a: pytest.fail("the training started"))
    res = CliRunner().invoke(main, ["train", str(recipe_factory(train={"epochs": 1})), "--artifacts", str(art)])
    assert res.exit_code == 2 and "something other than a file is there" in res.output, res.output


def test_logged_warnings_read_as_warnings(capsys):
    """`category 'x' has 7 validation normals ...` came bare on stderr; predict's own said `warning:`."""
    import logging
    from uadc.cli.terminal import _LogHandler
    h = _LogHandler()
    h.setFormatter(logging.Formatter("%(message)s"))
    for level, msg in ((logging.WARNING, "few normals"), (logging.INFO, "checkpoint written")):
        h.emit(logging.LogRecord("uadc.data", level, __file__, 1, msg, None, None))
    assert capsys.readouterr().err == "warning: few normals\ncheckpoint written\n"


def test_checkpoint_option_given_the_recipe_file_is_refused(recipe_factory, tmp_path):
    """`uadc eval R --checkpoint R` evaluated R's own checkpoint and rewrote its eval.json."""
    r = recipe_factory()
    for cmd in (["eval", str(r)], ["compile", str(r), "--no-eval"]):
        res = CliRunner().invoke(main, [*cmd, "--checkpoint", str(r), "--artifacts", str(tmp_path / "art")])
        assert res.exit_code == 2 and res.output.strip().splitlines()[-1] == \
            f"error: --checkpoint {r}: a recipe file, not a checkpoint (checkpoint.pt)", res.output


def test_a_bare_group_shows_its_help_not_an_error():
    res = CliRunner().invoke(main, ["recipes"])
    assert "error:" not in res.output and "Commands:" in res.output


def test_a_signal_held_until_a_step_was_written_says_so(capsys, monkeypatch):
    """SIGTERM during predict's final commit (tables and overlays, written whole) said "nothing was written
    for the unfinished step", of a run whose results had all been written."""
    import contextlib
    import signal
    from uadc.cli.terminal import _Terminated, exit_on_user_error
    monkeypatch.setattr(_Terminated, "seen", False)   # remembered for the process: not past this test
    from uadc.core.process import signals_deferred
    for held, says in ((True, "terminated (SIGTERM) just after a step was written in full; nothing after it ran"),
                       (False, "terminated (SIGTERM); nothing was written for the unfinished step")):
        with pytest.raises(SystemExit) as stop:
            with exit_on_user_error():
                with signals_deferred() if held else contextlib.nullcontext():
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(1000):   # the handler runs between bytecodes
                        pass
        assert stop.value.code == 143 and capsys.readouterr().err.strip() == says


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill stdout")
def test_stdout_that_cannot_be_written_is_one_error_line(tmp_path):
    """`uadc ... > /dev/full` (a full disk) ended in a 25-line traceback and exit 1; with --json the error
    document's own write raised a second one."""
    import subprocess
    import sys
    for args in (["calibrators", "list"], ["recipes", "list"], ["--help"], ["--version"]):   # the last two at parsing
        with open("/dev/full", "w") as full:
            p = subprocess.run([sys.executable, "-m", "uadc", *args], stdout=full, stderr=subprocess.PIPE, text=True)
        assert p.returncode == 2 and p.stderr == "error: cannot write to stdout: No space left on device\n", p.stderr


def test_a_path_the_system_cannot_look_up_is_a_user_error(recipe_factory, tmp_path, monkeypatch):
    """A part over 255 bytes (any path argument or option) or a symlink loop (eval --checkpoint) was an
    OSError / RuntimeError traceback, exit 1, and --json printed no document."""
    monkeypatch.chdir(tmp_path)
    long = "b" * 300
    recipe = recipe_factory()
    for args in (["eval", f"{long}.yaml"], ["recipes", "show", f"{long}.yaml"], ["check-trt", long]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and res.output.endswith("...: File name too long\n"), res.output
    res = CliRunner().invoke(main, ["compile", f"{long}.yaml", "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["error"].endswith("...: File name too long")
    (tmp_path / "lp1").symlink_to("lp2")
    (tmp_path / "lp2").symlink_to("lp1")
    res = CliRunner().invoke(main, ["eval", str(recipe), "--checkpoint", "lp1"])
    assert res.exit_code == 2 and "lp1" in res.output and "Traceback" not in res.output, res.output


def test_closed_or_vanishing_standard_streams_are_no_traceback(recipe_factory, tmp_path):
    """`uadc doctor >&-` was an AttributeError traceback (Python makes a closed stdout None), `2>&-` turned a
    user error's exit 2 into 1, and a stderr reader gone (`2>&1 >out.json | head -1`) ended a training
    with a silent exit 1 at its next log line: no checkpoint, no JSON."""
    import shlex
    import subprocess
    import sys
    uadc = f"{shlex.quote(sys.executable)} -m uadc"

    def sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path)
    p = sh(f"{uadc} recipes list >&-")
    assert p.returncode == 2 and p.stderr == "error: cannot write to stdout: Bad file descriptor\n", p.stderr
    p = sh(f"{uadc} train nope.yaml 2>&-")
    assert p.returncode == 2 and p.stdout == "" and p.stderr == ""
    recipe = recipe_factory(train={"epochs": 3, "threads": 1})
    p = sh(f"{uadc} train {shlex.quote(str(recipe))} --artifacts art --json 2>&1 >out.json | head -c 1 >/dev/null; "
           f"echo ${{PIPESTATUS[0]}}")
    assert p.stdout.strip() == "0", p
    assert json.loads((tmp_path / "out.json").read_text())["models"][0]["epochs"] == 3


@pytest.mark.parametrize("args, said", [
    (["predict", "x", "y", "--category", "a", "--category=b"], "--category given twice ('a', then 'b'): give it once"),
    (["compile", "demo", "--per-channel", "--per-tensor"], "--per-channel and --per-tensor both given: give one"),
    (["calibrators", "compare", "demo", "--target", "a", "--target", "b"], "--target given twice"),
    (["predict", "x", "y", "--category", "a", "--category=a"], "artifact folder not found: x"),   # the same: fine
    (["verify", "x", "--budget", "a=1", "--budget", "b=2"], "no model.onnx"),     # repeatable
    (["predict", "x", "y", "--category", "--category", "--out", "o"], "artifact folder not found: x"),   # a value
])
def test_an_option_given_twice_with_two_values_is_refused(tmp_path, monkeypatch, args, said):
    """`--category a --category b` judged every image at b's thresholds without a word (click keeps the last)."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and said in res.output, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in res.output


def test_one_class_training_reads_every_image_first_and_says_what_it_replaces(tiny_data, tmp_path, caplog):
    """An unreadable training image of the second category stopped `train --one-class` after the first
    category's model was replaced (a folder of 2-epoch and 1-epoch models); a one-class checkpoint of other
    model settings was replaced without the warning a unified one gives."""
    import hashlib

    import uadc
    from conftest import write_recipe
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    r = write_recipe(tmp_path / "tiny.yaml", data, train={"epochs": 1, "threads": 1})
    art = tmp_path / "art"
    uadc.train(r, one_class=True, artifacts=art)
    ckpts = sorted((art / "tiny" / "one_class").rglob("checkpoint.pt"))
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpts]
    (sorted((data / "stripes" / "train" / "good").glob("*.png"))[-1]).write_bytes(b"junk")   # the second category
    with pytest.raises(uadc.UadcError, match="unreadable image"):
        uadc.train(r, one_class=True, epochs=2, artifacts=art)
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpts] == before
    shutil.rmtree(data)
    shutil.copytree(tiny_data, data)
    (tmp_path / "other").mkdir()
    other = write_recipe(tmp_path / "other" / "tiny.yaml", data, train={"epochs": 1, "threads": 1},
                         model={"taps": ["blocks.2", "blocks.4"]})
    with caplog.at_level("WARNING", logger="uadc"):
        uadc.train(other, one_class=True, artifacts=art)
    assert caplog.text.count("replacing a checkpoint trained with other data/model settings (model.taps") == 2


def test_an_error_line_is_at_most_2000_characters_with_its_prefix(recipe_factory, tmp_path):
    """A message capped at 2000 became a 2007-character line once "error: " was put before it."""
    r = recipe_factory()
    doc = yaml.safe_load(r.read_text())
    doc["x" * 3000] = 1
    r.write_text(yaml.safe_dump(doc))
    res = CliRunner().invoke(main, ["train", str(r), "--artifacts", str(tmp_path / "art")])
    line = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and line.startswith("error: ") and len(line) == 2000, len(line)


def test_a_file_given_with_a_trailing_slash_is_refused(tmp_path):
    """`uadc train r.yaml/` and `uadc predict ART img.png/` ran the file (pathlib drops the '/'), where
    `cat r.yaml/` says "Not a directory"; a folder with one is still a folder."""
    (tmp_path / "r.yaml").write_text("name: r\n")
    (tmp_path / "img.png").write_bytes(b"x")
    for args, name in ((["train", f"{tmp_path / 'r.yaml'}/"], "RECIPE"),
                       (["predict", str(tmp_path), f"{tmp_path / 'img.png'}/"], "INPUTS...")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and f"Invalid value for '{name}': " in res.stderr, res.stderr
        assert "is a file, not a folder (it ends in '/')" in res.stderr
    res = CliRunner().invoke(main, ["predict", f"{tmp_path}/", f"{tmp_path}/"])   # folders: past the option check
    assert "is a file, not a folder" not in res.stderr
