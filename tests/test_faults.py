"""Fault tests: SIGKILL of ``uadc train`` and ``uadc compile`` at random moments (and exactly while
the artifact is being written) never leaves a partial artifact, and the next run succeeds and
leaves no temp; two concurrent runs of one recipe are serialised by a file lock and both end
sound. Subprocesses, a tiny 32 px recipe, bounded loops (README "Guarantees")."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest

from bench.stress import (artifact_problems, checkpoint_problems, kill_when, make_setup, one_error_line,
                          temps_under, uadc_cmd)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TARGET = "ort-cpu-int8"


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(uadc_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(uadc_cmd(*args), capture_output=True, text=True, env=ENV)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    recipe = make_setup(root, epochs=2)
    return root, recipe


def test_kill_train_then_retrain(setup):
    """Killed while writing the checkpoint and at a random moment: never a partial checkpoint;
    the next train succeeds and leaves no temp."""
    root, recipe = setup
    art = root / "art_train"
    ckpt = art / recipe.stem / "checkpoint.pt"
    rng = np.random.default_rng(0)
    for i, watch in enumerate((art / recipe.stem, None)):
        p = _start("train", str(recipe), "--artifacts", str(art))
        when = kill_when(p, float(rng.uniform(3, 25)), watch)
        p.communicate()
        assert not checkpoint_problems(ckpt, recipe), f"kill {i} ({when}) left a broken checkpoint"
    res = _run("train", str(recipe), "--artifacts", str(art))
    assert res.returncode == 0, res.stderr[-2000:]
    assert ckpt.is_file() and not checkpoint_problems(ckpt, recipe)
    assert not temps_under(art)


def test_kill_compile_then_recompile_and_concurrent(setup):
    """Compile killed while writing and at a random moment: no partial artifact; then two
    concurrent compiles of one recipe/target: both succeed (serialised) or one fails in one line;
    the artifact is sound and no temp is left."""
    root, recipe = setup
    art = root / "art_compile"
    res = _run("train", str(recipe), "--artifacts", str(art))
    assert res.returncode == 0, res.stderr[-2000:]
    out = art / recipe.stem / TARGET
    rng = np.random.default_rng(1)
    for i, watch in enumerate((art / recipe.stem, None)):
        p = _start("compile", str(recipe), "--artifacts", str(art), "--target", TARGET, "--no-eval")
        when = kill_when(p, float(rng.uniform(3, 30)), watch)
        p.communicate()
        assert not artifact_problems(out), f"kill {i} ({when}) left a broken artifact"
    pair = [_start("compile", str(recipe), "--artifacts", str(art), "--target", TARGET, "--no-eval")
            for _ in range(2)]
    for p in pair:
        _, err = p.communicate()
        assert p.returncode == 0 or (p.returncode == 2 and one_error_line(err)), err[-2000:]
    assert any(p.returncode == 0 for p in pair)
    assert out.is_dir() and not artifact_problems(out)
    assert not temps_under(art), temps_under(art)


def test_two_compiles_into_one_new_out_folder_never_replace_each_other(setup):
    """Both exited 0 and the later one silently replaced the earlier's artifact, without --force."""
    root, recipe = setup
    art = root / "art_out"
    assert _run("train", str(recipe), "--artifacts", str(art)).returncode == 0
    out = root / "one_out"
    pair = [_start("compile", str(recipe), "--artifacts", str(art), "--target", t, "--no-eval", "--out", str(out))
            for t in ("ort-cpu-fp32", TARGET)]
    errs = [p.communicate()[1] for p in pair]
    assert sorted(p.returncode for p in pair) == [0, 2], errs
    loser = errs[[p.returncode for p in pair].index(2)]
    assert one_error_line(loser) and "exists; pass --force" in loser, loser
    winner = ("ort-cpu-fp32", TARGET)[[p.returncode for p in pair].index(0)]
    assert f'"target": "{winner}"' in (out / "artifact.json").read_text() and not artifact_problems(out)


def test_concurrent_trains(setup):
    """Two trains of one recipe at once (the old fixed ``.tmp`` name crashed 3 of 4 pairs)."""
    root, recipe = setup
    art = root / "art_pair"
    pair = [_start("train", str(recipe), "--artifacts", str(art)) for _ in range(2)]
    for p in pair:
        _, err = p.communicate()
        assert p.returncode == 0 or (p.returncode == 2 and one_error_line(err)), err[-2000:]
    ckpt = art / recipe.stem / "checkpoint.pt"
    assert ckpt.is_file() and not checkpoint_problems(ckpt, recipe)
    assert not temps_under(art)


def test_sigterm_while_writing_removes_the_temp_and_says_so(setup):
    """SIGTERM (a pipeline's timeout, `docker stop`) killed uadc at once, silently, leaving its
    temp until the next run; it now unwinds as Ctrl-C does: exit 143, one line, no temp."""
    root, recipe = setup
    art = root / "art_term"
    # one process trains, then compiles: stopped the moment a temp appears (the checkpoint's, which
    # lives briefly, or else the artifact folder's)
    p = _start("compile", str(recipe), "--artifacts", str(art), "--target", TARGET, "--no-eval", "--train-if-missing")
    when = kill_when(p, 120.0, art / recipe.stem, signal.SIGTERM)
    _, err = p.communicate()
    assert when == "while writing" and p.returncode == 143, (when, err[-2000:])
    # stopped in a temp's life: the unfinished step wrote nothing, or (held while the checkpoint was being
    # committed) the step was finished first and said so
    assert err.strip().splitlines()[-1] in ("terminated (SIGTERM); nothing was written for the unfinished step",
                                            "terminated (SIGTERM) just after a step was written in full; nothing "
                                            "after it ran")
    assert not temps_under(art) and not (art / recipe.stem / TARGET).exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_after_the_result_is_out_keeps_its_exit_code(setup, sig, code):
    """A SIGTERM in the second or two of interpreter teardown after a success document ended the
    process with 143 and no word: a pipeline saw a failure next to `{"recipe": ...}`."""
    import json
    import time
    root, recipe = setup
    cmd = uadc_cmd("train", str(recipe), "--artifacts", str(root / f"art_late{code}"), "--json")
    p = subprocess.Popen([cmd[0], "-u", *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    first = ""                           # the document, written unbuffered as the command returns
    while not first.endswith("\n}") and p.poll() is None:
        first += p.stdout.read(1)
    time.sleep(0.05)
    p.send_signal(sig)
    rest, err = p.communicate()
    doc = json.loads(first + rest)
    assert p.returncode == 0 and doc["recipe"] == recipe.stem, (p.returncode, err[-1000:])


def test_ctrl_c_between_the_checkpoint_and_its_recipe_copy_lands_after_both(recipe_factory, tmp_path, monkeypatch,
                                                                            ctrl_c_raises):
    """The checkpoint was renamed into place, then recipe.yaml written: Ctrl-C in between left the new
    model beside the earlier model's recipe (epochs 2 in the checkpoint, 1 in its recipe copy)."""
    import yaml
    import uadc
    from uadc.training import checkpoint as ck
    r = recipe_factory(data={"image_size": 32}, train={"epochs": 1, "threads": 1})
    uadc.train(r, artifacts=tmp_path)
    real = ck.atomic_write_text

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)   # as a Ctrl-C typed right after the checkpoint's rename
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "atomic_write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        uadc.train(r, artifacts=tmp_path, epochs=2)
    monkeypatch.undo()
    folder = tmp_path / "tiny"
    assert ck.read_checkpoint(folder / "checkpoint.pt")["recipe"]["train"]["epochs"] == 2
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["train"]["epochs"] == 2


def test_ctrl_c_during_an_artifact_folders_swap_lands_after_it(tmp_path, monkeypatch, ctrl_c_raises):
    """Between the swap's two renames a Ctrl-C left the old and the new artifact both in temps, which the next
    writer deleted (neither survived); during the old folder's removal it said "nothing was written"."""
    from uadc.core import io
    final = tmp_path / "art"
    manifest = {"schema": 1, "uadc_version": "x", "files": {}}
    with io.atomic_dir(final) as tmp:
        (tmp / "artifact.json").write_text(json.dumps({**manifest, "v": "old"}))
    real = os.replace
    monkeypatch.setattr(io, "exchange_paths", lambda a, b: False)   # two renames, where one swap is impossible

    def replace(a, b):
        real(a, b)
        if os.path.basename(b) != "art":   # the old folder moved aside: the window between the renames
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt) as e:
        with io.atomic_dir(final) as tmp:
            (tmp / "artifact.json").write_text(json.dumps({**manifest, "v": "new"}))
    monkeypatch.undo()
    assert json.loads((final / "artifact.json").read_text())["v"] == "new" and e.value.uadc_after_step
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.lock", "art"]


def test_an_artifact_folder_is_swapped_in_one_step(tmp_path, monkeypatch):
    """A kill -9 between the swap's two renames (old moved aside, new not yet in) left no artifact folder, the old
    and the new one in temps that the next writer deleted. Where Linux swaps two paths in one step, no moment
    leaves the folder missing."""
    from uadc.core import io
    from uadc.core.process import exchange_paths
    (a := tmp_path / "a").mkdir(), (b := tmp_path / "b").mkdir()
    if not exchange_paths(a, b):
        pytest.skip("this system or file system cannot swap two paths in one step (renameat2 RENAME_EXCHANGE)")
    final = tmp_path / "art"
    manifest = {"schema": 1, "uadc_version": "x", "files": {}}
    with io.atomic_dir(final) as tmp:
        (tmp / "artifact.json").write_text(json.dumps({**manifest, "v": "old"}))
    real_replace = os.replace

    def replace(src, dst):
        assert os.path.basename(src) != "art", "the artifact folder was moved away"
        real_replace(src, dst)
    monkeypatch.setattr(io.os, "replace", replace)
    with io.atomic_dir(final) as tmp:
        (tmp / "artifact.json").write_text(json.dumps({**manifest, "v": "new"}))
    assert json.loads((final / "artifact.json").read_text())["v"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.lock", "a", "art", "b"]


def test_another_machines_temp_is_left_to_it(tmp_path, monkeypatch):
    """Every write removed the temps of writers whose pid is not alive here: a sweep cell on one Ray node deleted
    another node's cell while it was being written (a shared artifacts root). A temp names its machine now; another
    machine's is removed only once a week old, this machine's as soon as its writer is gone."""
    import os
    import time
    from uadc.core import io
    dead = 4_000_000   # above Linux's largest pid
    host, boot = io._host()
    other = "0123abcd" if host != "0123abcd" else "3210dcba"
    here, there, old = (tmp_path / f".cell{io.TMP_TAG}{dead}@{h}.{boot}-deadbeef" for h in (host, other, other[::-1]))
    rebooted = tmp_path / f".ckpt{io.TMP_TAG}{os.getpid()}@{host}.{'0000' if boot != '0000' else '1111'}-deadbeef"
    for p in (here, there, old, rebooted):   # an earlier boot's writer no longer runs, whatever its pid is now
        p.mkdir()
        (p / "model.onnx").write_bytes(b"half")
    week = time.time() - (io.FOREIGN_TEMP_DAYS + 1) * 86400
    os.utime(old, (week, week))
    ours = io._tmp_name(tmp_path / "cell")
    assert io.TMP_RE.match(ours.name).group("host", "boot") == io._host()
    io.atomic_write_bytes(tmp_path / "x.txt", b"x")   # a write cleans its folder
    assert there.is_dir() and not here.exists() and not old.exists() and not rebooted.exists()
