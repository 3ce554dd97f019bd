"""Run a plan on Ray: a local instance by default (the cores it is given), or an existing cluster.

Tasks declare their resources: a training takes ``run.train_cpus`` CPUs, a baseline and a cell
``run.threads`` CPUs (and ``run.gpus``). A model's baseline depends on its training and every
cell on its model's baseline, as Ray object references, so Ray orders the work and cells of
different models overlap. A worker killed mid-task (OOM, kill -9, a lost node) is retried by
Ray (``max_retries``); the cell's artifact folder is written atomically, so a killed attempt
leaves only a temp folder that the retry removes. Results stream back with ``ray.wait``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable

from uadc.core.errors import UadcError
from uadc.core.scoped import process_state_kept, quiet_third_party
from uadc.pipeline.sweep import cells as C
from uadc.pipeline.sweep.plan import Plan, cell_key
from uadc.pipeline.sweep.run import INSTALL_HINT
from uadc.pipeline.sweep.store import write_record

log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UadcError(INSTALL_HINT) from None
    return ray


def run_on_ray(plan: Plan, out: Path, artifacts: Path, address: str | None, num_cpus: int | None,
               done: dict[int, dict], on_record: Callable[[dict], None]) -> list[dict]:
    """Every cell's record (in plan order); ``done`` (finished cells, by index) are not rerun."""
    with process_state_kept():   # Ray (its import too) sets environment variables, sys.excepthook, signal
        ray = import_ray()       # handlers, warning filters, seeds Python's random
        if ray.is_initialized():   # the caller's own Ray session: use it, leave it running
            _check_fits(ray, plan.run, local=False)
            return _run(ray, plan, out, artifacts, done, on_record)
        # "local": a new instance of our own even when `ray start` runs on this machine
        local = address in (None, "local")   # --num-cpus sizes it (a cluster's CPUs are its own: refused before)
        kwargs = {"address": "local", "num_cpus": num_cpus or os.cpu_count()} if local else {"address": address}
        _check_answers(address)
        main_thread = threading.current_thread() is threading.main_thread()
        on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        try:
            with quiet_third_party(), tempfile.TemporaryDirectory(prefix="uadc-ray-") as empty:
                # Ray puts the folder uadc runs in first on every worker's sys.path: an onnxruntime.py or
                # numpy.py there ran in the workers. An empty working_dir is what they get instead (a job's
                # own working_dir, `ray job submit --working-dir`, already keeps that folder out: two clash)
                env = {} if _job_working_dir() and not local else {"runtime_env": {"working_dir": empty}}
                if local:   # a Ray job's runtime env (its packages, py_modules, pip) lives on its cluster, which
                    os.environ.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)   # a local Ray cannot reach (restored after)
                ray.init(**kwargs, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                         configure_logging=False, **env)
        except (ConnectionError, ValueError) as exc:   # ValueError: an address Ray cannot parse
            where = "start a local Ray" if local else f"connect to the Ray cluster at {address}"
            raise UadcError(f"cannot {where}: {C.one_line(exc)}") from None
        if main_thread:   # Ray's handler aborted the process (SIGABRT, a C++ stack dump) on `docker stop`
            signal.signal(signal.SIGTERM, on_sigterm)
        try:
            _check_fits(ray, plan.run, local=local)
            return _run(ray, plan, out, artifacts, done, on_record)
        finally:
            ray.shutdown()


def _job_working_dir() -> bool:
    """Whether this process is a Ray job's driver whose job gives a working_dir."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    env = job.get("runtime_env") if isinstance(job, dict) else None
    return isinstance(env, dict) and bool(env.get("working_dir"))


def _check_fits(ray, run, local: bool) -> None:
    """A task asking for more CPUs (run.threads) or GPUs (run.gpus) than any node has waited for
    ever, without a word (Ray's own warning is not shown): refused on the local Ray, noted on a cluster
    (an autoscaler may add such a node)."""
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    for key, what, need in (("threads", "CPU", run.threads), ("gpus", "GPU", run.gpus)):
        have = max((r.get(what, 0) for r in nodes), default=0)
        if need and need > have:
            said = f"run.{key}: each cell asks for {need:g} {what}s, but no Ray node has more than {have:g}"
            if local:
                raise UadcError(said + ("; lower run.threads or raise --num-cpus" if what == "CPU" else
                                        "; this machine has none Ray can use: set run.gpus: 0"))
            log.warning("%s: the cells wait until a node that has them joins", said)


def _check_answers(address: str | None, timeout: float = 5.0) -> None:
    """A ``host:port`` where nothing listens: Ray retried its connection for ever (the command hung,
    its log lines on stderr), so ask the port once first."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():   # auto, local, or one Ray parses and refuses itself
        return
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError, OverflowError) as exc:
        raise UadcError(f"cannot connect to the Ray cluster at {address}: nothing answers there "
                        f"({C.one_line(exc) or type(exc).__name__})") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):   # a TLS cluster's handshake is its own
            _check_grpc(conn, address)


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])   # + an empty SETTINGS


def _check_grpc(conn: socket.socket, address: str) -> None:
    """Ray's GCS and client server speak gRPC, whose server opens with an HTTP/2 SETTINGS frame. A port that
    answers otherwise (an HTTP server, Ray's dashboard on 8265) made ray.init retry for ever."""
    head, why = b"", ""
    try:
        conn.sendall(_HTTP2_PREFACE)
        while len(head) < 4 and (part := conn.recv(9 - len(head))):   # a frame may come in several segments
            head += part
    except OSError as exc:
        why = C.one_line(exc) or type(exc).__name__
    why = why or (f"it answered {head[:8]!r}" if head else "it closed the connection")
    if len(head) < 4 or head[3] != 4:   # the frame type of SETTINGS
        raise UadcError(f"cannot connect to the Ray cluster at {address}: something answers there but not as Ray's "
                        f"gRPC server does ({why}); give the head node's GCS address (default port 6379), or "
                        f"ray://HOST:10001 for Ray Client")


def _run(ray, plan: Plan, out: Path, artifacts: Path, done: dict[int, dict],
         on_record: Callable[[dict], None]) -> list[dict]:
    run = plan.run
    total = int(ray.cluster_resources().get("CPU", 1))
    opts = {"max_retries": run.max_retries, "retry_exceptions": False}
    train_t = ray.remote(C.ensure_model)
    base_t = ray.remote(num_cpus=run.threads, **opts)(C.build_baseline)
    cell_t = ray.remote(num_cpus=run.threads, num_gpus=run.gpus, **opts)(C.run_cell)
    records: dict[int, dict] = {}
    infos, bases, pending = {}, {}, {}
    for i, cell in enumerate(plan.cells):
        if i in done:
            records[i] = done[i]
            on_record(records[i])
            continue
        model = plan.models[cell.model]
        if model.key not in infos:
            try:
                infos[model.key] = _model_info(ray, train_t, model, artifacts, run, total, opts)
            except UadcError as exc:   # a checkpoint of other settings: its cells fail, the others run (as sequential)
                infos[model.key] = C.one_line(exc)
        info = infos[model.key]
        if isinstance(info, str):
            records[i] = C.failed_record(cell, None, None, info)
            on_record(records[i])
            continue
        if model.key not in bases:
            bases[model.key] = base_t.options(name=f"baseline:{model.name}").remote(model, info, run)
        # the task name is the worker's process title while it runs (ray::cell:<id>)
        ref = cell_t.options(name=f"cell:{cell.id}").remote(cell, model, info, bases[model.key], out, artifacts, run)
        pending[ref] = i
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            records[i] = _result(ray, ready[0], plan, i, infos, out)
            on_record(records[i])
    except BaseException:   # Ctrl-C / SIGTERM: cells went on finishing (and writing) through Ray's shutdown
        for ref in [*pending, *bases.values(), *(v for v in infos.values() if not isinstance(v, (C.ModelInfo, str)))]:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    return [records[i] for i in range(len(plan.cells))]


def _model_info(ray, train_t, model, artifacts: Path, run, total: int, opts: dict):
    """A ModelInfo now when the checkpoint exists (cheap: a hash), else a training task's ref."""
    if model.checkpoint(artifacts).is_file():
        return C.ensure_model(model, artifacts, False)
    cpus = min(total, run.train_cpus or model.recipe().train.threads or total)
    return train_t.options(num_cpus=cpus, name=f"train:{model.name}", **opts).remote(model, artifacts, run.train)


def _result(ray, ref, plan: Plan, i: int, infos: dict, out: Path) -> dict:
    """The cell's record; a task that failed for good (retries spent, training failed) is recorded."""
    try:
        return ray.get(ref)
    except Exception as exc:  # RayTaskError, WorkerCrashedError, ...: recorded, the sweep goes on
        cell = plan.cells[i]
        model = plan.models[cell.model]
        info, key = infos[model.key], None
        try:
            info = info if isinstance(info, C.ModelInfo) else ray.get(info)
            key = cell_key(cell, model, info.sha256, plan.run)
        except Exception as train_exc:
            exc, info = train_exc, None
        cause = getattr(exc, "cause", None)
        record = C.failed_record(cell, key, info, C.one_line(cause if isinstance(cause, BaseException) else exc))
        if key is not None:
            write_record(out, record)
        return record
