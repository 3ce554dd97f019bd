"""`uadc doctor`: CPU features from /proc/cpuinfo, and what each target can do here."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from uadc.cli import main
from uadc.config.targets import TARGETS
from uadc.pipeline import doctor as doc

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8
"""


@pytest.fixture
def fake_cpu(monkeypatch):
    monkeypatch.setattr(doc, "_cpuinfo", lambda: CPUINFO.splitlines())


def test_cpu_features_from_cpuinfo(fake_cpu):
    r = doc.doctor()
    assert r.cpu == "Test CPU 9000"
    f = r.cpu_features
    assert f["AVX-512 VNNI"] is True and f["AMX-INT8"] is True and f["AMX"] is True
    assert f["AVX-VNNI"] is False and f["AMX-BF16"] is False
    assert "AVX-512 VNNI" in next(t.detail for t in r.targets if t.target == "ort-cpu-int8")
    if r.versions["openvino"] is not None:  # bf16 targets say whether this CPU has bf16 at all
        assert "no AMX-BF16 / AVX-512 BF16" in next(t.detail for t in r.targets if t.target == "openvino-cpu-bf16")
        assert "bf16" not in next(t.detail for t in r.targets if t.target == "openvino-cpu-int8")


def test_avx2_only_cpu_warns_of_8_bit_weights(monkeypatch):
    avx2_only = CPUINFO.replace(" avx512f avx512_vnni amx_tile amx_int8", "")
    monkeypatch.setattr(doc, "_cpuinfo", lambda: avx2_only.splitlines())
    detail = next(t.detail for t in doc.doctor().targets if t.target == "ort-cpu-int8")
    assert "no VNNI/AMX" in detail and "8-bit weights" in detail and "saturate" in detail


def test_no_cpuinfo_means_unknown(monkeypatch):
    monkeypatch.setattr(doc, "_cpuinfo", lambda: [])
    r = doc.doctor()
    assert set(r.cpu_features.values()) == {None}
    assert "unknown" in next(t.detail for t in r.targets if t.target == "ort-cpu-int8")


def test_every_target_reported_and_trt_is_bundle_only_without_tensorrt(fake_cpu, monkeypatch):
    monkeypatch.setattr(doc, "trt_available", lambda: (False, "tensorrt not importable: test"))
    r = doc.doctor()
    assert [t.target for t in r.targets] == list(TARGETS)
    by = {t.target: t for t in r.targets}
    assert by["ort-cpu-fp32"].can == by["ort-cpu-int8"].can == "run"
    for name, t in TARGETS.items():
        if t.runtime == "tensorrt":
            assert by[name].can == "bundle only", name
    assert "emulated by ONNX Runtime" in by["trt-int8"].detail
    assert r.tensorrt is None and "test" in r.tensorrt_reason


def test_trt_present_runs_gpu_targets_and_emulates_jetson_off_a_jetson(fake_cpu, monkeypatch):
    """A TensorRT without package metadata (a tarball's, or on PYTHONPATH) with uadc's CPU torch: doctor said
    `tensorrt not installed`, `GPU: none` and `TensorRT None on the GPU`; any aarch64 machine (a Grace Hopper
    server) was taken for a Jetson."""
    import sys
    import types
    monkeypatch.setattr(doc, "trt_available", lambda: (True, "TensorRT 10.3.0 with 1 CUDA device(s)"))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(doc, "cuda_device_count", lambda: (1, ""))
    monkeypatch.setattr(doc, "_version", lambda dists: None)
    monkeypatch.setattr(doc, "_is_jetson", lambda: False)
    monkeypatch.setattr(doc.platform, "machine", lambda: "aarch64")
    r = doc.doctor()
    by = {t.target: t for t in r.targets}
    assert by["trt-int8"].can == "run" and by["jetson-int8"].can == "emulate"
    assert r.tensorrt == r.versions["tensorrt"] == "10.3.0" and r.gpu == "1 CUDA device(s)"
    assert by["trt-fp16"].detail == "TensorRT 10.3.0 on 1 CUDA device(s): --build-engine builds it"
    monkeypatch.setattr(doc, "_is_jetson", lambda: True)
    assert {t.target: t.can for t in doc.doctor().targets}["jetson-int8"] == "run"
    monkeypatch.setattr(doc, "trt_available", lambda: (False, "no CUDA GPU visible"))   # it imports; no GPU
    monkeypatch.setattr(doc, "cuda_device_count", lambda: (0, "no CUDA GPU visible"))
    r = doc.doctor()
    assert r.versions["tensorrt"] == "10.3.0" and r.tensorrt is None and r.gpu is None


def test_cli_doctor_text_and_json(fake_cpu):
    res = CliRunner().invoke(main, ["doctor"])
    assert res.exit_code == 0, res.output
    assert "AVX-512 VNNI yes" in res.output and "targets:" in res.output
    res = CliRunner().invoke(main, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["cpu_features"]["AMX-INT8"] is True
    assert {t["target"] for t in d["targets"]} == set(TARGETS)


def test_doctor_without_torch_says_not_installed_for_its_threads(fake_cpu):
    """The runtime-only install (no torch) printed `threads: torch None`."""
    r = doc.doctor()
    r.threads["torch"] = None
    assert "threads: torch not installed, usable cores" in r.to_text()


def test_doctor_json_stopped_by_ctrl_c_is_one_document(monkeypatch):
    """Ctrl-C during doctor's checks (seconds: imports, an OpenVINO child) left `--json`'s stdout empty,
    where every other command prints {"error": ..., "exit_code": 130}."""
    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr(doc, "doctor", stopped)
    res = CliRunner().invoke(main, ["doctor", "--json"])
    assert res.exit_code == 130 and json.loads(res.stdout) == {"error": "interrupted", "exit_code": 130}


@pytest.mark.parametrize("blocked", ["onnx", "polygraphy", "torch"])
def test_a_package_that_does_not_import_is_one_line_and_doctor_says_so(blocked, tmp_path):
    """With onnx (or polygraphy) installed but not importable, `uadc doctor` itself ended in a traceback
    (it imported the TensorRT build module, which imports onnx) or said `run` for every target, and
    compile / verify ended in `ModuleNotFoundError` tracebacks."""
    import subprocess
    import sys
    code = (f"import sys; sys.modules[{blocked!r}] = None; sys.argv = ['uadc'] + sys.argv[1:]\n"
            "from uadc.cli import run; run()")

    def uadc(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)

    p = uadc("doctor", "--json")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert {t["can"] for t in json.loads(p.stdout)["targets"]} == {"unavailable"}
    assert f"{blocked} does not import here" in json.loads(p.stdout)["targets"][0]["detail"]
    if blocked == "torch":   # doctor itself reads torch's threads and GPUs: it refused to run at all
        return
    for args in (["verify", str(tmp_path)], ["diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]):
        (tmp_path / "a.onnx").write_bytes(b"")
        p = uadc(*args)
        assert p.returncode == 2 and p.stderr.startswith(f"error: the {blocked} module does not import here ("), p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr


@pytest.mark.parametrize("broken", ["onnxruntime", "PIL", "filelock"])
def test_a_package_whose_shared_library_is_missing_is_reported(broken, tmp_path):
    """An onnxruntime raising OSError (its .so gone) ended doctor, the tool for that case, in an error (CLI)
    or a traceback (API); a broken Pillow or filelock left every target `run` while every compile failed."""
    import os
    import subprocess
    import sys
    (tmp_path / broken).mkdir()
    (tmp_path / broken / "__init__.py").write_text(f"raise OSError('lib{broken}.so: cannot open shared object file')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    code = "import sys; sys.argv = ['uadc', 'doctor', '--json']\nfrom uadc.cli import run; run()"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    targets = json.loads(p.stdout)["targets"]
    assert {t["can"] for t in targets} == {"unavailable"}
    assert targets[0]["detail"].startswith(f"{broken} does not import here (OSError: lib{broken}.so")


def test_arm_cpu_features_and_no_x86_saturation_note(monkeypatch):
    """On an Arm CPU doctor said "AVX2 no" and warned of x86's 8-bit-weight saturation, which Arm does not have."""
    arm = "processor\t: 0\nFeatures\t: fp asimd aes crc32 atomics asimddp i8mm bf16\n"
    monkeypatch.setattr(doc, "_cpuinfo", lambda: arm.splitlines())
    r = doc.doctor()
    assert r.cpu_features == {"dot product": True, "I8MM": True, "BF16": True, "SVE": False}
    by = {t.target: t.detail for t in r.targets}
    assert by["ort-cpu-int8"].endswith("CPU INT8 instructions: dot product, I8MM")
    monkeypatch.setattr(doc, "_cpuinfo", lambda: arm.replace(" asimddp i8mm bf16", "").splitlines())
    detail = {t.target: t.detail for t in doc.doctor().targets}["ort-cpu-int8"]
    assert "no dot product / I8MM" in detail and "saturate" not in detail and "VNNI" not in detail


def test_only_a_failed_import_of_a_package_is_one_line(tmp_path, monkeypatch):
    """A broken install (a package whose module code raises ImportError or OSError: a missing shared
    library) was a traceback; an error a package raises as it runs, or uadc's own import, must stay one."""
    import sys
    from uadc.core.errors import UadcError, dependencies_checked
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("raise OSError('libbroken.so: cannot open shared object file')")
    (tmp_path / "workingpkg.py").write_text("def boom():\n    raise OSError('disk full')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def as_uadc(code: str) -> None:   # run from a frame of uadc's, as its lazy imports are
        exec(compile(code, "uadc_code.py", "exec"), {"__name__": "uadc.somewhere"})

    with pytest.raises(UadcError, match=r"^the brokenpkg module does not import here \(OSError: libbroken.so"):
        with dependencies_checked():
            as_uadc("import brokenpkg")
    with pytest.raises(OSError, match="disk full"), dependencies_checked():
        as_uadc("import workingpkg; workingpkg.boom()")
    with pytest.raises(ImportError, match="cannot import name 'nothing'"), dependencies_checked():
        as_uadc("from uadc.core.errors import nothing")   # a bug of uadc's: its traceback stands
    monkeypatch.setitem(sys.modules, "json.nothing", None)
    with pytest.raises(UadcError, match=r"^json .* has no module json.nothing .*a version uadc does not support"):
        with dependencies_checked():
            as_uadc("import json.nothing")
    # on the runtime-only install (no torch) a missing runtime package is named, not `pip install uadc` (GBs)
    monkeypatch.setitem(sys.modules, "filelock", None)
    with pytest.raises(UadcError, match=r"\(pip install uadc, with the extras"), dependencies_checked():
        as_uadc("import filelock")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UadcError, match=r"this needs it: pip install filelock$"), dependencies_checked():
        as_uadc("import filelock")


def test_doctor_leaves_the_callers_process_as_found(tmp_path):
    """A service's health check: `uadc.doctor()` set scikit-learn's KMP_* variables (children inherit them),
    added warning filters, drew from Python's random stream, and left OpenVINO's telemetry thread running."""
    import subprocess
    import sys
    code = ("import os, random, threading, warnings\nimport numpy as np\nimport uadc.pipeline.doctor as d\n"
            "def state(): return (dict(os.environ), warnings.filters[:], random.getstate(), np.random.get_state()[1]"
            ".tolist(), sorted(t.name for t in threading.enumerate()))\n"
            "before = state(); d.doctor(); after = state()\n"
            "print([i for i, (a, b) in enumerate(zip(before, after)) if a != b], set(after[0]) - set(before[0]), "
            "after[4])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("[] set() ['MainThread']"), p.stdout


def test_bf16_targets_are_unavailable_where_openvino_computes_f32(monkeypatch):
    """doctor said `run` for openvino-cpu-bf16 on a CPU where OpenVINO takes the bf16 hint and computes in f32,
    which compile refuses."""
    monkeypatch.setattr(doc, "_version", lambda dists: "2026.0")
    monkeypatch.setattr(doc, "_openvino_check", lambda: (None, "f32"))
    targets = {t.target: t for t in doc.doctor().targets}
    for name in ("openvino-cpu-bf16", "openvino-cpu-int8-bf16"):
        assert (targets[name].can, targets[name].detail) == (
            "unavailable", "OpenVINO computes in f32 on this CPU when asked for bf16"), targets[name]
    assert targets["openvino-cpu-int8"].can == "run"


def test_a_package_that_is_installed_but_does_not_import_says_so_on_the_versions_line(fake_cpu, monkeypatch):
    """A broken onnxruntime showed `onnxruntime 1.x` on the versions line, while every target said it did not import."""
    real = doc.importlib.import_module

    def broken(name, *a, **k):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("x")
        return real(name, *a, **k)
    monkeypatch.setattr(doc.importlib, "import_module", broken)
    r = doc.doctor()
    assert r.not_importing == ["onnxruntime"] and r.to_dict()["not_importing"] == ["onnxruntime"]
    assert f"onnxruntime {r.versions['onnxruntime']} (does not import)" in r.to_text().splitlines()[1]


def test_the_openvino_check_runs_no_module_of_the_current_folder(tmp_path, monkeypatch):
    """The child process that imports OpenVINO for doctor ran an `openvino.py` of the folder doctor runs in."""
    import sys
    (tmp_path / "openvino.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\nraise ImportError('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "openvino", raising=False)   # the check runs in a child
    why, _ = doc._openvino_check()
    assert not (tmp_path / "ran").exists() and "shadowed" not in (why or "")
