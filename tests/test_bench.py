"""bench.paper_tables end-to-end on tiny synthetic data (STFPM and PaSTe, 64 px, 2 epochs, one-class on,
QAT skipped there and run once on its own): every table is in the markdown with numbers, the JSON
holds the same numbers, those numbers are the compile reports' own, and the figures exist."""

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.paper_tables import (BenchOptions, _reusable, ensure_checkpoints, main, prepare_recipe,
                                qat_row, run_bench)
from uadc.core.errors import UadcError

TRAIN = {"epochs": 2, "threads": 1}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_data):
    from conftest import write_recipe
    d = tmp_path_factory.mktemp("bench")
    recipes = [write_recipe(d / "stfpm_tiny.yaml", tiny_data, train=TRAIN),
               write_recipe(d / "paste_tiny.yaml", tiny_data, train=TRAIN,
                            model={"method": "paste", "split": "blocks.0"})]
    art, out = d / "artifacts", d / "out"
    opts = BenchOptions(qat=False, one_class=True, latency_runs=3, log=lambda m: None)
    result = run_bench(recipes, art, out, opts)
    return result, recipes, art, out, opts


def _section(md: str, title: str) -> str:
    start = md.index(title)
    end = md.find("\n## ", start + 1)
    return md[start:end if end > 0 else None]


def _numeric_rows(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("|") and re.search(r"\| [+-]?\d\.\d{4} ", line)]


def test_markdown_and_json_agree(bench_run):
    result, _, _, out, _ = bench_run
    md = (out / "paper_tables.md").read_text()
    saved = json.loads((out / "paper_tables.json").read_text())
    assert saved["table4"]["cells"] == json.loads(json.dumps(result["table4"]["cells"]))
    t2, t4, t57 = (_section(md, t) for t in ("## Table 2", "## Table 4", "## Tables 5–7"))
    for s in (t2, t4, t57):
        assert _numeric_rows(s), s
    for e in saved["table2"]:
        assert e["one_class"] is not None
        for k in ("image_auroc", "pixel_auroc"):
            assert f"{e['unified']['mean'][k]:.4f}" in t2 and f"{e['one_class']['mean'][k]:.4f}" in t2
            for cat, v in e["unified"]["categories"].items():
                assert f"{v[k]:.4f}" in t2, cat
    assert len(saved["table4"]["cells"]) == 4
    for c in saved["table4"]["cells"].values():
        assert f"{c['image_auroc']:.4f} / {c['pixel_auroc']:.4f}" in t4
    rows = saved["tables5_7"]
    assert [r["precision"] for r in rows] == ["FP32", "INT8-PTQ", "INT8-PTQ", "INT8-QAT", "FP16"] * 2
    for r in rows:
        if r["note"]:
            assert r["note"] in t57
            continue
        assert f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f}" in t57 and f"{r['latency_p50_ms']:.2f}" in t57
        assert f"{r['model_bytes']:,}" in t57
    head = md[:md.index("## Table 2")]
    assert "threads" in head and "torch" in head and "onnxruntime" in head and "total run time" in head


def test_numbers_come_from_the_reports(bench_run):
    result, _, _, _, _ = bench_run
    for r in result["tables5_7"]:
        if r["note"]:
            continue
        rep = json.loads(Path(r["source"]).read_text())
        assert r["image_auroc"] == rep["metrics"]["compiled"]["mean"]["image_auroc"]
        assert r["latency_p50_ms"] == rep["latency_ms"]["compiled"]["p50"] > 0
        assert r["bytes"] == rep["bytes"] and rep["target"] == r["target"]
        assert rep["quantized_partitions"] == ([] if r["precision"] == "FP32" else r["quantized"])
    stfpm = [r for r in result["tables5_7"] if r["method"] == "stfpm" and r["precision"] == "INT8-PTQ"]
    best = result["table4"]["cells"][result["table4"]["best"]]
    assert all((r["calibrator"], r["calib_data"]) == (best["calibrator"], best["calib_data"]) for r in stfpm)
    fp32 = next(r for r in result["tables5_7"] if r["method"] == "stfpm" and r["precision"] == "FP32")
    assert stfpm[0]["bytes"]["student"] < fp32["bytes"]["student"] / 2  # INT8 student weights
    assert result["tables5_7"][-1]["note"].startswith("FP16: no runtime here")


def test_figures_exist(bench_run):
    result, _, _, out, _ = bench_run
    pngs = ["auroc_vs_latency.png"] + list(result["figures"]["overlays"].values())
    assert sorted(result["figures"]["overlays"]) == ["gray", "stripes"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # atomic: no temp folder left
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask   # tempfile.mkdtemp's 0700 was kept


def test_checkpoints_reused_and_checked(bench_run):
    _, recipes, art, _, opts = bench_run
    r = prepare_recipe(recipes[0], opts)
    ck = ensure_checkpoints(r, art, True, lambda m: None)
    assert ck["unified"]["reused"] and ck["unified"]["epochs"] == 2
    assert all(i["reused"] for i in ck["one_class"].values())
    other = r.with_overrides(model={"smoothing_sigma": 2.0})  # different model -> not reusable
    assert _reusable(Path(ck["unified"]["path"]), other, lambda m: None) is None


def test_budget_options_use_their_own_artifact_folder(recipe_factory):
    r = prepare_recipe(recipe_factory("tiny", train={"epochs": 12}), BenchOptions(epochs_scale=0.5, threads=1))
    assert r.name == "tiny_x0.5" and r.train.epochs == 6 and r.train.threads == 1


def test_qat_missing_is_reported_not_fatal(bench_run, monkeypatch):
    _, recipes, art, _, opts = bench_run
    monkeypatch.setitem(sys.modules, "uadc.quant.qat.run", None)  # import of uadc.quant.qat.run now fails
    row = qat_row(prepare_recipe(recipes[0], opts), None, ("entropy", "train"), art, BenchOptions(qat=True))
    assert row["precision"] == "INT8-QAT" and row["note"].startswith("not available:")


def test_qat_row_starts_from_the_given_cell(bench_run):
    from uadc.pipeline import api
    _, recipes, art, _, opts = bench_run
    r = prepare_recipe(recipes[0], opts)
    row = qat_row(r, api.baseline(r, artifacts=art), ("mse", "train"), art,
                  BenchOptions(qat=True, latency_runs=2, log=lambda m: None))
    assert row["note"] is None and row["precision"] == "INT8-QAT" and row["calibrator"] == "qat (init mse)"
    rep = json.loads(Path(row["source"]).read_text())
    assert rep["calibrator"] == "qat" and rep["quantized_partitions"] == ["student"]
    assert row["image_auroc"] == rep["metrics"]["compiled"]["mean"]["image_auroc"]
    init = json.loads((art / r.name / "qat_ort-cpu-int8" / "qat.json").read_text())["settings"]["init"]
    assert (init["calibrator"], init["calib_data"]) == ("mse", "train")


def test_out_must_be_a_bench_output(recipe_factory, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(UadcError, match="not a bench output"):  # refused before any training
        run_bench([recipe_factory("tiny")], tmp_path / "a", out, BenchOptions(log=lambda m: None))
    assert (out / "notes.txt").read_text() == "keep" and not (tmp_path / "a").exists()


def test_bench_grids_and_folders_are_checked_before_the_work(recipe_factory, tmp_path, capsys):
    """A sigma of nan or -1 was scored by the LOCO benches and could be chosen (loco_head chose
    sigma=nan); --out as a recipe's folder trained everything, then refused to write (one holding
    --artifacts would have swapped the checkpoints away; the default, <artifacts>/bench, was refused too); stress wrote into a full --workdir; pred_label_check
    named a missing artifact as a missing default recipe; a 0 µs kind's ratio printed inf."""
    import click

    from bench import loco, pred_label_check, stress
    from bench.precision_breakdown import markdown as breakdown_md
    assert loco._floats("0,2.5") == (0.0, 2.5) and loco.number_list("1,4", "--sigmas") == [1.0, 4.0]
    for bad, said in (("1,nan", "finite numbers of 0 or more"), ("1,-1", "finite numbers of 0 or more"),
                      ("1,inf", "finite numbers of 0 or more"), ("2,2", "listed twice")):
        with pytest.raises(click.BadParameter, match=said):
            loco._floats(bad)
        with pytest.raises(UadcError, match=f"--alphas: .*{said}"):
            loco.number_list(bad, "--alphas")
    from bench import loco_train
    for bad in ("0,0.05", "0.05,5"):   # top0% was scored as top 1%, top500% accepted
        with pytest.raises(click.BadParameter, match=r"top-k fractions must be in \(0, 1\]"):
            loco.topk_fractions(bad)
        res = CliRunner().invoke(loco_train.main, ["--topk", bad, "--artifacts", str(tmp_path / "lt")])
        assert res.exit_code == 2 and "top-k fractions must be in (0, 1]" in res.output, res.output
    assert not (tmp_path / "lt").exists()
    r = recipe_factory("tiny")
    for out, art in ((tmp_path / "same", tmp_path / "same"), (tmp_path / "res", tmp_path / "res" / "art"),
                     (tmp_path / "art2" / "tiny", tmp_path / "art2"), (tmp_path / "art3" / "tiny" / "t", tmp_path / "art3")):
        with pytest.raises(UadcError, match="holds --artifacts .* or a recipe's folder there"):
            run_bench([r], art, out, BenchOptions(log=lambda m: None))
        assert not art.exists()   # refused before any training
    from bench.paper_tables import check_out_place
    check_out_place(tmp_path / "art4" / "bench", tmp_path / "art4", ["tiny"])   # the documented default
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        stress.main(["--workdir", str(full)])
    assert e.value.code == 2 and "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["mine.txt"]
    with pytest.raises(UadcError, match="artifact folder not found"):
        pred_label_check.main([str(tmp_path / "nothere")])
    b = {"batch": 1, "fp32_us": 10.2, "all_int8_us": 8.0, "chosen_us": 1.0, "chosen_ratio": 1.0, "floor_us": 1.0, "floor_ratio": 1.0, "groups_floor_ratio": 1.0,
         "parts": {}, "qdq_us": 0.0, "outside_groups_us": 0.0,
         "kinds": {"backbone Add": {"fp32_us": 0.2, "int8_us": 3.0}, "conv": {"fp32_us": 10.0, "int8_us": 5.0}}}
    text = breakdown_md("art", b)
    assert "| backbone Add | 0 | 3 | - |" in text and "| conv | 10 | 5 | 0.50 |" in text and "inf" not in text
    # stress: an unknown target or a negative seed trained first, then "a broken promise" / a numpy traceback
    for bad in (["--target", "bogus"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as e:
            stress.main(["--workdir", str(tmp_path / "st"), *bad])
        assert e.value.code == 2 and not (tmp_path / "st").exists()
    # --out an existing file: the bench ran, then FileExistsError
    from bench import head_equivalence, loco_head, peers
    (tmp_path / "afile").write_text("")
    for script in (head_equivalence, loco_head, peers):
        with pytest.raises(SystemExit) as e:
            script.main(["--out", str(tmp_path / "afile"), "--artifacts", str(tmp_path / "none")])
        assert e.value.code == 2 and "a file, not a folder" in capsys.readouterr().err
    # peers' plot of --batches 8 (no batch 1): a KeyError after the tables were written
    pytest.importorskip("matplotlib")
    system = {"name": "uadc x", "origin": "uadc", "latency": {"b8": {"p50_ms": 2.0}},
              "accuracy": {"mean": {"image_auroc": 0.9}}}
    assert peers.plot({"recipes": [{"image_size": 32, "systems": [system]}]}, tmp_path / "p.png")


def test_map_only_studies_say_what_of_the_recipe_they_leave_out(recipe_factory, tmp_path, capsys):
    """bench.loco_head labelled the exact head's map 'recipe' for a `head: fast` recipe with an image kNN (its
    figures were not `uadc eval`'s, unsaid); --threads 0 ran silently."""
    from bench import loco, loco_head
    from uadc import load_recipe
    plain = load_recipe(recipe_factory("plain"))
    knn = load_recipe(recipe_factory("knn", model={"head": "fast", "image_knn": {"weight": 0.5}}))
    assert loco.map_only_note(plain, exact_layers=True) is None
    assert "without the image kNN term (weight 0.5)" in loco.map_only_note(knn)
    assert "model.head fast" not in loco.map_only_note(knn)   # bench.loco reads the head's own maps
    assert "without model.head fast (maps upsampled as the exact head does) and the image kNN term" in \
        loco.map_only_note(knn, exact_layers=True)
    for argv in (["--threads", "0"], ["--threads", "-2"]):
        with pytest.raises(SystemExit) as e:
            loco_head.main(argv)
        assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_cli_user_error(tmp_path):
    res = CliRunner().invoke(main, ["--recipes", str(tmp_path / "nope.yaml"), "--artifacts", str(tmp_path / "a")])
    assert res.exit_code == 2 and res.output.strip().startswith("error: recipe not found")
    assert not (tmp_path / "a").exists()


def _search_record() -> dict:
    groups = [  # (partition, op, fp32 µs, int8 µs, chosen)
        ("teacher", "Conv 3x3 + Clip", 100.0, 60.0, "int8"), ("student", "Conv 3x3 dw + Clip", 40.0, 50.0, "fp32"),
        ("student", "Conv 1x1", 80.0, 30.0, "fp32"), ("head", "Mul", 10.0, 12.0, "fp32")]
    return {"profile": {"batch": 1, "fp32_us": 250.0, "all_int8_us": 172.0, "other_fp32_us": 20.0},
            "final": {"predicted_us": 200.0, "qdq_us": 10.0},
            "groups": [{"partition": p, "op": op, "fp32_us": a, "int8_us": b, "precision": c,
                        "reason": "" if c == "int8" else "fidelity budget"} for p, op, a, b, c in groups]}


def test_precision_breakdown_floor_and_parts(tmp_path, capsys):
    """The floor takes each group at its faster precision plus the nodes outside the groups; the parts
    add up to what the chosen assignment spends in its groups."""
    from bench.precision_breakdown import breakdown, main
    b = breakdown(_search_record())
    assert b["floor_us"] == 20 + 60 + 40 + 30 + 10 and b["floor_ratio"] == round(160 / 250, 3)
    assert b["groups_floor_ratio"] == round(140 / 230, 3) and b["chosen_ratio"] == 0.8
    assert b["parts"]["backbone dense conv, INT8"] == {"groups": 1, "us": 60.0}
    assert b["parts"]["backbone depthwise conv, FP32 (fidelity budget)"]["us"] == 40.0
    assert sum(p["us"] for p in b["parts"].values()) == 60 + 40 + 80 + 10
    assert b["kinds"]["backbone dense conv"] == {"fp32_us": 180.0, "int8_us": 90.0}
    art = tmp_path / "art"
    art.mkdir()
    (art / "report.json").write_text(json.dumps({"precision_search": _search_record()}))
    main([str(art)])
    assert "**0.640x** of all FP32" in capsys.readouterr().out
    (art / "report.json").write_text(json.dumps({"precision": "target"}))
    with pytest.raises(UadcError, match="not compiled with an ONNX Runtime precision-auto search"):
        main([str(art)])   # as a script: one error: line and exit 2 (SystemExit("error: ...") exited 1)


def test_search_time_profiles_at_the_asked_batch_and_writes_its_record(bench_run, tmp_path, capsys):
    """``bench.search_time --profile-batch 2 --record DIR``: the search profiles 2 images a run, and DIR's
    report.json is a record ``bench.precision_breakdown`` reads."""
    from bench.precision_breakdown import main as breakdown_main
    from bench.search_time import main as search_main
    _, recipes, art, _, _ = bench_run
    search_main([str(recipes[0]), "--artifacts", str(art), "--threads", "1", "--profile-batch", "2",
                 "--record", str(tmp_path / "rec")])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((tmp_path / "rec" / "report.json").read_text())["precision_search"]
    assert record["profile"]["batch"] == 2 and record["final"]["int8_groups"] == line["int8_groups"]
    breakdown_main([str(tmp_path / "rec")])
    assert "ORT profile, batch 2:" in capsys.readouterr().out


def test_threshold_coverage_compares_both_rules_in_every_scenario(tmp_path, capsys):
    """Every scenario has a row per category for the own-spread rule and for uadc's, the JSON holds
    what the table prints, and too few draws is a usage error."""
    from bench.threshold_coverage import SCENARIOS, SIZES, main
    assert main(["--draws", "30", "--json", str(tmp_path / "c.json")]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert set(res["scenarios"]) == set(SCENARIOS) and res["draws"] == 30
    for rules in res["scenarios"].values():
        for rule in ("own", "uadc"):
            assert [r["n"] for r in rules[rule]] == list(SIZES)
            assert all(0 <= r[k] <= 1 for r in rules[rule] for k in ("covered", "far_mean", "far_p95"))
    out = capsys.readouterr().out
    assert out.count("\n| ") == 1 + len(SCENARIOS) * len(SIZES)      # the header, then a row per category
    assert main(["--draws", "3"]) == 2


def test_bench_scripts_user_mistakes_and_help(recipe_factory, tmp_path, capsys):
    """Bench scripts: a UadcError was a traceback, `--cycles 0` numpy's, an empty artifacts folder printed
    nothing and exited 0, `--help` showed the docstring's first line cut mid-sentence, `--quick --epochs N`
    trained into the plain `--epochs N` folders."""
    import importlib
    from bench import as_script, summary
    from bench import ab_latency, int8_exactness
    from bench.unified_table import TableOptions, variant_recipes
    from uadc.config.recipe import load_recipe

    def boom():
        raise UadcError("recipe not found: x.yaml")
    with pytest.raises(SystemExit) as e:
        as_script(boom)
    assert e.value.code == 2 and capsys.readouterr().err == "error: recipe not found: x.yaml\n"
    r = recipe_factory()
    with pytest.raises(UadcError, match="no ONNX Runtime INT8 artifact under"):
        int8_exactness.main([str(r), "--artifacts", str(tmp_path / "none")])
    for bad in (["--cycles", "0"], ["--runs", "0"], ["--batch", "x"]):
        with pytest.raises(SystemExit):
            ab_latency.main([str(tmp_path), *bad])
        assert "error: argument" in capsys.readouterr().err
    from bench import head_equivalence, loco_image_knn, loco_patch_knn, peers, search_time, stress, threshold_coverage, \
        twin_fusion
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "artifact.json").write_text("{}")
    for main, bad, said in (   # a traceback after the work, NaN figures, or nothing tested, before
            (int8_exactness.main, ["r.yaml", "--cycles", "-2"], "-2 is below 0"),
            (int8_exactness.main, ["r.yaml", "--batch", "0"], "0 is below 1"),
            (head_equivalence.main, ["--rounds", "0"], "0 is below 1"),
            (head_equivalence.main, ["--batches", "1,x"], "'x' is not a whole number"),
            (twin_fusion.main, ["--batches", "0"], "0 is below 1"),
            (stress.main, ["--n", "0"], "0 is below 1"),
            (stress.main, ["--n", "2", "--kill", "3"], "--kill 3: more than --n 2"),
            (threshold_coverage.main, ["--json", str(tmp_path / "nodir" / "x.json")], "no folder"),
            (search_time.main, ["r.yaml", "--record", str(art)], "an artifact folder"),
            # a traceback after all the timing (a folder as --json), or after the feature extraction
            (ab_latency.main, [str(tmp_path), "--json", str(tmp_path)], "a folder; give a file name"),
            (peers.main, ["--batches", "0,x"], "0 is below 1"),
            (peers.main, ["--runs", "0"], "0 is below 1"),
            (loco_image_knn.main, ["--k", "0"], "0 is below 1"),
            (loco_image_knn.main, ["--weights", "1,nan"], "nan is not a finite number above 0"),
            (loco_patch_knn.main, ["--banks", "x"], "'x' is not a whole number")):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2 and said in capsys.readouterr().err, bad
    for name in ("ab_latency", "threshold_coverage", "int8_exactness", "verify_detection", "peers"):
        doc = summary(importlib.import_module(f"bench.{name}").__doc__)
        assert doc.rstrip(")`").endswith((".", "?", ":")) and "\n" not in doc, (name, doc)
    dcam = load_recipe(recipe_factory("d", train={"dcam": {"enabled": True}}))
    plain, quick = ({k: v.name for k, v in variant_recipes(dcam, o).items()}
                    for o in (TableOptions(epochs=1), TableOptions(epochs=1, quick=True)))
    assert plain["dcam"] != quick["dcam"] and quick["dcam"].endswith("_quick_e1")


def test_verify_detection_cases_are_judged_not_refused_as_tampered(int8_artifact, tmp_path):
    """The injected cases rewrote model.onnx but not its sha256 in artifact.json: `uadc verify` refused
    the first one as changed after compile and the bench stopped without its table."""
    import uadc
    from bench.verify_detection import scale_first_student_conv, wrong_normalisation
    recipe, art, _ = int8_artifact
    src = uadc.compile(recipe, "ort-cpu-fp32", artifacts=art, out=tmp_path / "fp32", evaluate=False, latency_runs=1,
                       threads=1).path
    scale_first_student_conv(src, tmp_path / "conv", 3.0)
    wrong_normalisation(src, tmp_path / "norm", ((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    for case in ("conv", "norm"):
        res = uadc.verify(tmp_path / case, golden=src, normal_only=True)
        assert not res.passed, case   # judged, and caught
