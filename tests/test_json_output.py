"""Output a pipeline can read: `--json` prints exactly one JSON document on stdout (the API
result's to_dict()), and stderr carries no progress bars and no third-party warnings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import write_recipe
from uadc.cli import main

# what a normal run must not write to stderr: tqdm bars (carriage returns, "it/s", "| n/m"), torch's
# glog-style log lines ("W1130 08:15:37.312000 ..."), Python warnings, the exporter's torchvision notes
NOISE = [re.compile(p) for p in (r"\r", r"it/s\]", r"\|\s*\d+/\d+", r"^[WIE]\d{4} \d\d:\d\d", r"Warning:",
                                 r"torchvision", r"^\[torch\.onnx\]")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    import uadc
    d = tmp_path_factory.mktemp("json")
    recipe = write_recipe(d / "tiny.yaml", tiny_data, train={"epochs": 1, "threads": 1})
    uadc.train(recipe, artifacts=d / "artifacts")
    return recipe, d / "artifacts"


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "uadc.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_compile_json_one_document_and_clean_stderr(trained, tmp_path, tiny_data):
    """A fresh process (the exporter warns once per process), stdout and stderr both pipes."""
    recipe, art = trained
    res = _run("compile", str(recipe), "--target", "ort-cpu-int8", "--artifacts", str(art), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)                       # the whole of stdout is one JSON document
    assert res.stdout.count("\n") == res.stdout.rstrip("\n").count("\n") + 1
    report = json.loads((art / "tiny" / "ort-cpu-int8" / "report.json").read_text())
    assert set(doc) == set(report) | {"path"}          # CompileResult.to_dict() keys, plus where
    assert doc["target"] == "ort-cpu-int8" and doc["path"] == str(art / "tiny" / "ort-cpu-int8")
    assert doc["metrics"]["compiled"]["mean"] == report["metrics"]["compiled"]["mean"]
    noisy = [line for line in res.stderr.splitlines() if any(p.search(line) for p in NOISE)]
    assert "\r" not in res.stderr and not noisy, noisy
    assert res.stderr.count("artifact written:") == 1   # the human summary went to stderr, once (logged too before)
    # every partition, as `nodes` has ({"student": 52} alone: report["qdq_nodes"]["teacher"] was a KeyError)
    assert list(report["qdq_nodes"]) == ["teacher", "student", "head"] and report["qdq_nodes"]["teacher"] == 0
    good = sorted((tiny_data / "gray" / "test" / "good").glob("*.png"))[:1]
    pred = CliRunner().invoke(main, ["predict", doc["path"], *map(str, good), "--out", str(tmp_path / "p"), "--json"])
    assert list(json.loads(pred.stdout)["verdicts"]) == ["defective", "good"], pred.output   # in the order first seen


def test_user_error_json_and_own_error_line(tmp_path):
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "missing.yaml"), "--json"])
    assert res.exit_code == 2
    assert json.loads(res.stdout) == {"error": f"recipe not found: {tmp_path / 'missing.yaml'}", "exit_code": 2}
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == \
        [f"error: recipe not found: {tmp_path / 'missing.yaml'}"]


@pytest.mark.parametrize("stop, code, said", [(KeyboardInterrupt, 130, "interrupted"),
                                              ("terminated", 143, "terminated (SIGTERM)")])
def test_a_stopped_run_still_prints_one_json_document(trained, monkeypatch, stop, code, said):
    """SIGTERM (a pipeline's timeout) or Ctrl-C during `--json` left stdout empty: no document to read."""
    import uadc.cli.terminal
    from uadc.pipeline import api
    stop = uadc.cli.terminal._Terminated if stop == "terminated" else stop

    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(api, "evaluate", stopped)
    recipe, art = trained
    res = CliRunner().invoke(main, ["eval", str(recipe), "--artifacts", str(art), "--json"])
    assert res.exit_code == code and json.loads(res.stdout) == {"error": said, "exit_code": code}
    assert res.stderr.strip().splitlines()[-1] == f"{said}; nothing was written for the unfinished step"


def test_train_and_eval_json_keys_match_api(trained, tmp_path):
    import uadc
    recipe, art = trained
    res = CliRunner().invoke(main, ["eval", str(recipe), "--artifacts", str(art), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    api = uadc.evaluate(recipe, recipe, artifacts=art)
    assert set(doc) == set(api.to_dict()) | {"path"}
    assert doc["mean"] == pytest.approx(api.mean)
    out = tmp_path / "art2"
    res = CliRunner().invoke(main, ["train", str(recipe), "--epochs", "1", "--artifacts", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"recipe", "recipe_hash", "one_class", "models"}
    assert doc["models"][0]["checkpoint"] == str(out / "tiny" / "checkpoint.pt")


def test_quiet_resets_between_invocations():
    from uadc.core import progress
    CliRunner().invoke(main, ["-q", "recipes", "list"])
    assert progress._ENABLED is False
    CliRunner().invoke(main, ["recipes", "list"])
    assert progress._ENABLED is None                   # bars again only on a terminal


@pytest.mark.parametrize("args, said", [
    (["sweep", "{d}/no-such-sweep.yaml", "--sequential", "--json"], "sweep file not found"),   # with or without Ray
    (["verify", "{d}/no-such-artifact", "--json", "-"], "not a uadc artifact folder"),
    (["diff", "{d}/a", "{d}/b", "--budget", "spearman_min=2", "--json", "-"], "not a uadc artifact folder"),
])
def test_sweep_verify_diff_json_user_error_is_one_document(tmp_path, args, said):
    """Every command with a JSON mode prints a JSON document on stdout for a user error too."""
    res = CliRunner().invoke(main, [a.format(d=tmp_path) for a in args])
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["exit_code"] == 2 and said in doc["error"], doc
    # verify / diff: the shape of their reports (a pipeline reads `passed`), as written at --json FILE
    gate = {"schema", "kind", "passed"} if args[0] in ("verify", "diff") else set()
    assert set(doc) == {"error", "exit_code"} | gate and doc.get("kind", args[0]) == args[0] and not doc.get("passed")
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [f"error: {doc['error']}"]


@pytest.mark.parametrize("args, said", [
    (["predict", "--json"], "Missing argument 'ARTIFACT'."),
    (["compile", "r.yaml", "--json", "--bogus"], "No such option '--bogus'."),
    (["verify", "art", "--json", "-", "--budget"], "Option '--budget' requires an argument."),
    (["diff", "a", "b", "--json=-", "--threads", "0"], "Invalid value for '--threads'"),
    (["nosuch", "--json"], "No such command 'nosuch'."),
    (["--bogus", "train", "--json"], "No such option '--bogus'."),   # an option before the command
    (["--json", "train"], "No such option '--json'."),
    # "" (an unset $DIR) was the working folder: predict walked all of it, or wrote its tables there
    (["predict", "art", "", "--json"], "Invalid value for 'INPUTS...': an empty path"),
    (["predict", "art", "x.png", "--out", "", "--json"], "Invalid value for '--out': an empty path"),
    (["train", "", "--json"], "Invalid value for 'RECIPE': an empty path"),
])
def test_a_usage_error_under_json_is_one_document_too(args, said):
    """Click's usage errors (an unknown option, a missing argument) left stdout empty under --json."""
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert set(doc) == {"error", "exit_code"} and doc["exit_code"] == 2 and doc["error"].startswith(said), doc


@pytest.mark.parametrize("args", [["verify", "art", "--json", "r.json", "--bogus"], ["predict", "--bogus"]])
def test_a_usage_error_without_json_on_stdout_leaves_stdout_empty(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.stdout == "" and "No such option" in res.stderr


def test_an_option_before_the_command_gives_the_same_error_line():
    """`uadc --bogus train` gave click's `Error:` while every other mistake reads `error: ...`."""
    res = CliRunner().invoke(main, ["--bogus", "train"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == "error: No such option '--bogus'. Did you mean '--verbose'?"
    res = CliRunner().invoke(main, ["--bogus", "verify", "a", "--json", "r.json"])   # --json takes a file there
    assert res.exit_code == 2 and res.stdout == ""


@pytest.mark.parametrize("args, said", [(["doctor", "-q"], "uadc -q doctor ..."),
                                        (["recipes", "list", "--verbose"], "uadc --verbose recipes list ...")])
def test_a_global_option_after_the_command_says_where_it_goes(args, said):
    res = CliRunner().invoke(main, args, prog_name="uadc")
    assert res.exit_code == 2 and res.stderr.splitlines()[-1].endswith(f"goes before the command, {said}")
    res = CliRunner().invoke(main, args, prog_name="myuadc")   # a renamed entry point is named as run
    assert res.stderr.splitlines()[-1].endswith(f"goes before the command, my{said}")
    # under `python -m uadc` the hint was `uadc -q -m uadc doctor ...`
    res = CliRunner().invoke(main, args, prog_name="python -m uadc")
    assert res.exit_code == 2 and res.stderr.splitlines()[-1].endswith(f"goes before the command, python -m {said}")


def test_quiet_and_verbose_together_are_a_usage_error():
    """`uadc -q -v ...` ran: -v won the logs and -q the progress bars, without a word."""
    res = CliRunner().invoke(main, ["-q", "-v", "recipes", "list"])
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == "error: -q and -v say opposite things: give one"
    assert res.stdout == ""


def test_python_dash_m_uadc_is_the_command():
    """`python -m uadc` said "'uadc' is a package and cannot be directly executed"."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "uadc", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("uadc, version"), p.stderr
