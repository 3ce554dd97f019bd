from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from synthetic import make_category


@pytest.fixture(autouse=True)
def _uadc_logger_as_found():
    """A CLI test sets the ``uadc`` logger up (its stderr handler, no propagation); the next test in the
    worker then saw it (a test of what reaches stderr failed by test order alone): put it back after each."""
    import logging
    logger = logging.getLogger("uadc")
    kept = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.propagate = kept[0], kept[2]
    logger.setLevel(kept[1])


def _native_handler(sig) -> int | None:
    """The handler the C library holds (glibc, Linux): a native library replacing it is invisible to
    ``signal.getsignal``, which answers from Python's own table."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return None
    buf = ctypes.create_string_buffer(256)   # struct sigaction: sa_handler is its first field
    if ctypes.CDLL(None).sigaction(int(sig), None, buf) != 0:
        return None
    return int.from_bytes(buf.raw[:8], sys.byteorder)


def _signal_stack() -> tuple | None:
    """The thread's alternate signal stack (Linux): a native library leaving it at memory it freed made the
    next Ctrl-C of the worker a SIGSEGV (OpenVINO's CPU plugin), in whatever test came next."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return None
    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
    got = StackT()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(got)) != 0:
        return None
    return got.ss_sp, got.ss_flags, got.ss_size


@pytest.fixture(autouse=True)
def _signal_handlers_kept():
    """A test that leaves Ctrl-C's or SIGTERM's handler changed fails here (a later test of Ctrl-C in the
    same worker saw no KeyboardInterrupt: failures that came and went with the order of test files)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = (signal.SIGINT, signal.SIGTERM)
    before = ({k: signal.getsignal(k) for k in kinds}, signal.pthread_sigmask(signal.SIG_BLOCK, []),
              [_native_handler(k) for k in kinds], _signal_stack())
    yield
    after = ({k: signal.getsignal(k) for k in kinds}, signal.pthread_sigmask(signal.SIG_BLOCK, []),
             [_native_handler(k) for k in kinds], _signal_stack())
    for k, handler in before[0].items():
        signal.signal(k, handler if handler is not None else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, before[1])
    assert after == before, f"signal handlers, blocked signals or the signal stack left changed: {after} (were {before})"


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in this test whatever the test run inherited: a run started in the
    background by a non-interactive shell (``cmd &``) ignores SIGINT, and a re-raised Ctrl-C was then
    ignored as its caller asked (those runs failed the Ctrl-C tests). The inherited handler is put back."""
    import signal
    inherited = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited if inherited is not None else signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Two categories in MVTec layout: an RGB one and a grayscale one (as magnetic_tile)."""
    root = tmp_path_factory.mktemp("data")
    make_category(root, "stripes", seed=1, rgb=True, period=9.0)
    make_category(root, "gray", seed=2, rgb=False, period=13.0)
    return root


def write_recipe(path: Path, data_root: Path, **overrides) -> Path:
    cfg = {
        "data": {"sources": [{"root": str(data_root), "categories": ["stripes", "gray"]}], "image_size": 64},
        "model": {"method": "stfpm", "backbone": "efficientnet_lite0", "pretrained": True,
                  "taps": ["blocks.1", "blocks.3"], "smoothing_sigma": 1.0},
        "train": {"epochs": 12, "batch_size": 8, "lr": 0.003, "threads": 2},
        "compile": {"calib_samples": 8},
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def recipe_factory(tmp_path, tiny_data):
    def make(name: str = "tiny", **overrides) -> Path:
        return write_recipe(tmp_path / f"{name}.yaml", tiny_data, **overrides)
    return make


@pytest.fixture(scope="session")
def int8_artifact(tmp_path_factory, tiny_data):
    """(recipe path, artifacts root, compiled ort-cpu-int8 folder with in-graph post-processing):
    one tiny model shared by the deployment and runtime tests (tests/test_deploy.py, test_runtime.py)."""
    import uadc
    d = tmp_path_factory.mktemp("deploy")
    recipe = write_recipe(d / "tiny.yaml", tiny_data, train={"epochs": 2, "threads": 1}, data={"val_fraction": 0.25})
    art = d / "artifacts"
    uadc.train(recipe, artifacts=art)
    res = uadc.compile(recipe, "ort-cpu-int8", artifacts=art, latency_runs=2, threads=1, postprocess=True)
    return recipe, art, res


def fake_profile(models, feeds, threads, runs=20, warmup=5):
    """Deterministic stand-in for ORT's profiler (``precision.node_times``): every FP32 node 100 µs,
    every node of the quantized model 10 µs, its Q/DQ nodes 5 µs (so INT8 pays wherever it is not
    an island)."""
    from uadc.backends.ort_profile import NodeTime
    from uadc.core.constants import QDQ_OPS
    fp32, int8 = models
    return [[NodeTime(n.name, n.op_type, 100.0) for n in fp32.graph.node],
            [NodeTime(n.name, n.op_type, 5.0 if n.op_type in QDQ_OPS else 10.0, 1000) for n in int8.graph.node]]


def edited_artifact(src: Path, dst: Path, model=None, **changes) -> Path:
    """A copy of artifact ``src`` with ``changes`` in artifact.json and in the model's own uadc.deploy
    metadata (or another ``model`` in its place), every sha256 updated: a consistent, edited artifact."""
    import onnx
    from uadc.core.hashing import sha256_file
    from uadc.core.manifest import Manifest
    from uadc.export.onnx_export import set_metadata
    shutil.copytree(src, dst)
    meta = {**json.loads((dst / "artifact.json").read_text()), **changes}
    m = onnx.load(str(dst / "model.onnx")) if model is None else model
    if model is None:
        set_metadata(m, {"deploy": Manifest.from_dict(meta).essentials()})
    onnx.save(m, str(dst / "model.onnx"))
    meta["files"]["model.onnx"] = sha256_file(dst / "model.onnx")
    (dst / "artifact.json").write_text(json.dumps(meta))
    return dst
