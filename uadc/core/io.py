"""The one writer: every file and folder uadc produces goes through here.

Promises (README "Guarantees"):
- a file is written to a temp name unique to this process, flushed, then renamed into place,
  so readers see the old file or the new one, never half of one;
- an artifact folder is built in a temp folder beside its destination and renamed into place;
  an existing destination is replaced only when it is a uadc output folder (it holds one of
  ``OUTPUT_MARKERS``) and the caller allows it; anything else is left untouched (UadcError);
- temp names carry the writer's pid, so concurrent writers never share one, and temps left by a
  killed process (pid gone) are removed by the next writer in the same folder;
- concurrent writers of one destination are serialised by a file lock;
- files added to a folder one by one (predict's overlays) are staged beside it and moved in only
  once all are written, so a run stopped half-way adds none;
- folders are created with the default umask (readable by a deploy account), never 0700.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from uadc.core.constants import GRID_FILES, MANIFEST_FILE, QAT_FILE, QAT_JSON, TMP_TAG
from uadc.core.errors import UadcError, one_line
from uadc.core.folders import MAX_MARKER_BYTES, TMP_RE, files_added, files_added_to_artifact, grid_added
from uadc.core.process import exchange_paths, signals_deferred

LOCK_INSIDE = "uadc.lock"   # a folder's own lock file (hidden) where its parent cannot hold one
# A folder holding one of these was written by uadc and may be replaced by a newer output.
# a folder uadc wrote holds one of these, as uadc writes it (keys it always has): a user's own
# report.json made --force delete the folder and every file beside it
OUTPUT_MARKERS = {"artifact.json": ("schema", "uadc_version", "files"), "report.json": ("schema", "target", "recipe_hash"),
                  QAT_JSON: ("recipe_hash", "model_hash", "target"), "compare.json": ("cells", "target", "fp32"),
                  "sweep.json": ("cells", "pareto", "name")}
FOREIGN_TEMP_DAYS = 7   # another machine's temp (a shared artifacts root) is removed once this old


@functools.lru_cache(maxsize=1)
def _host() -> tuple[str, str]:
    """This machine (and container) and its boot in a temp's name: a pid means nothing on another
    machine (a sweep cell on one Ray node removed another node's cell while it was being written),
    and no writer of an earlier boot still runs."""
    import hashlib
    import socket
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
    except OSError:
        boot = ""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8], hashlib.sha256(boot.encode()).hexdigest()[:4]


def _tmp_name(final: Path) -> Path:
    """A hidden temp beside ``final``; its name is cut so that it, with ``.tmp``, stays within the
    255 bytes a file name may have (a legal 255-byte name plus the tag failed to write)."""
    tag = f"{TMP_TAG}{os.getpid()}@{'.'.join(_host())}-{uuid.uuid4().hex[:8]}"
    name = os.fsdecode(os.fsencode(final.name)[:255 - len(tag) - len(".") - len(".tmp")])
    return final.with_name(f".{name}{tag}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove temps in ``folder`` left by writers that no longer run (this machine's whose process is
    gone; another machine's after ``FOREIGN_TEMP_DAYS``); returns what was removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        if _stale(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def _stale(p: Path) -> bool:
    import time
    m = TMP_RE.match(p.name)
    if m is None:
        return False
    host, boot = _host()
    if m.group("host") in (None, host):   # no host: an older uadc's temp, taken as this machine's
        return m.group("boot") not in (None, boot) or not _pid_alive(int(m.group("pid")))   # an earlier boot's
    try:
        return time.time() - p.lstat().st_mtime > FOREIGN_TEMP_DAYS * 86400
    except OSError:
        return False


def file_key(path: Path) -> tuple:
    """One file however it is reached: a symlink, another spelling, or a hard link (``cp -al``,
    ``rsync --link-dest``: a test/good of hard links to train/good was trained on without a word)."""
    try:
        st = os.stat(path)
    except OSError:   # gone: its path, as before
        return (Path(path).resolve(),)
    return (st.st_dev, st.st_ino) if st.st_ino else (Path(path).resolve(),)   # 0: no inode numbers there


def check_no_phantom_parent(path: Path) -> None:
    """Refuse a ``..`` that follows a folder that does not exist. The system refuses such a path, but
    the folders a writer makes on the way give it a meaning past every check of what is there:
    ``verify --json ART/x/../model.onnx`` replaced the artifact's model with its report."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part == ".." and not Path(*parts[:i]).is_dir():   # Path() is '.'
            raise UadcError(f"{path}: '..' follows {Path(*parts[:i])}, which is no folder; name the path without it")


def check_dir_creatable(path: Path) -> None:
    """What ``ensure_dir`` refuses, for a check before any work: a file or a broken link in the way."""
    path = Path(path)
    check_no_phantom_parent(path)
    if path.exists() and not path.is_dir():
        raise UadcError(f"not a folder: {path}")
    if path.is_symlink() and not path.exists():
        raise UadcError(f"cannot create folder {path}: it is a broken link (to {os.readlink(path)})")


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents); a regular file in the way is a user error."""
    path = Path(path)
    check_dir_creatable(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UadcError(f"cannot create folder {path}: {exc.strerror or exc}") from None
    return path


def check_writable(folder: Path) -> None:
    """Fail before expensive work when ``folder`` (or its nearest existing parent) is not writable."""
    check_no_phantom_parent(folder)
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UadcError(f"not a folder: {p}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UadcError(f"folder is not writable: {p}")
    # os.access says yes to root even where writes fail (immutable folder, read-only mount): probe
    # with a pid-named temp (removed at once; clean_stale_temps removes it should we die here).
    probe = _tmp_name(p / "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        wanted = Path(folder).absolute()
        under = f"; {wanted} cannot be made there" if wanted != p else ""   # /proc/x: said only "/proc"
        raise UadcError(f"folder is not writable: {p} ({exc.strerror or exc}){under}") from None


def check_own_file(path: Path, ours: Callable[[str], bool], what: str) -> None:
    """Refuse, before any work, a file output that would replace what ``what`` (a uadc command)
    did not write: a folder, a symlink, a non-empty file whose first 4 KB (and first line, up to 1 MiB)
    ``ours`` does not recognise (a model, a user's notes); and one whose folder is not writable."""
    path = Path(path)
    check_no_phantom_parent(path)
    if path.is_symlink() or path.exists():
        plain = path.is_file() and not path.is_symlink()
        if plain:
            with open(path, encoding="utf-8", errors="replace") as fh:
                head = fh.read(4096)
                if "\n" not in head:   # a long first row (non-ASCII paths): cut off, it was "not ours"
                    head += fh.readline(1 << 20)
        if not plain or (head and not ours(head)):        # an empty file holds nothing to lose
            raise UadcError(f"{path} exists and was not written by {what}; choose another path "
                            f"(nothing was changed)")
    check_writable(path.parent)


def atomic_write_bytes(path: Path, data: bytes | bytearray | memoryview, executable: bool = False) -> Path:
    """``executable``: add execute bits wherever the umask left read bits (scripts)."""
    path = Path(path)
    if path.is_dir():
        raise UadcError(f"cannot write file {path}: a folder is in the way")
    ensure_dir(path.parent)
    clean_stale_temps(path.parent)
    tmp = Path(str(_tmp_name(path)) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(data))
            f.flush()
            os.fsync(f.fileno())
        if executable:
            mode = os.stat(tmp).st_mode
            os.chmod(tmp, mode | ((mode & 0o444) >> 2))
        os.replace(tmp, path)
    except BaseException as exc:   # Ctrl-C / SIGTERM mid-write too: no temp left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise UadcError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json(data: Any) -> str:
    """Strict JSON (no bare NaN/Infinity, which is not JSON): non-finite floats become null."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


class JsonResult:
    """``to_json()`` for a result with ``to_dict()``: the document ``--json`` prints (strict JSON)."""

    def to_json(self) -> str:
        return to_json(self.to_dict())   # type: ignore[attr-defined]


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:  # numpy scalar
        return _finite(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def parse_json(text: "str | bytes") -> Any:
    """``json.loads``; a document nested past Python's recursion limit (`[[[...` 100k deep) is a ValueError
    as any damaged one is, not a RecursionError traceback from the readers that catch ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: Path, what: str) -> Any:
    """A JSON file read back (one uadc wrote); missing, unreadable or damaged: one UadcError line."""
    try:
        return parse_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UadcError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
        raise UadcError(f"cannot read {what} {path}: {reason}") from None


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, to_json(data))


def atomic_save(path: Path, save: Any) -> Path:
    """``save(tmp_path)`` writes the file (e.g. ``torch.save``, ``onnx.save``); then rename."""
    path = Path(path)
    ensure_dir(path.parent)
    clean_stale_temps(path.parent)
    tmp = Path(str(_tmp_name(path)) + ".tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UadcError(f"cannot write {path}: {exc.strerror or exc}") from None
    except RuntimeError as exc:   # torch.save reports a full disk as its writer's RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink()
        free = shutil.disk_usage(path.parent).free
        raise UadcError(f"cannot write {path}: {one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)} "
                        f"({free:,} bytes free where it goes)") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def is_output_dir(path: Path) -> bool:
    return path.is_dir() and any(is_marker(path / name, keys) for name, keys in OUTPUT_MARKERS.items())


def is_marker(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > MAX_MARKER_BYTES:
            return False
        doc = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):   # unreadable, not UTF-8, not JSON: not uadc's
        return False
    return isinstance(doc, dict) and all(k in doc for k in keys)


def check_replaceable(final: Path, replace: bool = True, remedy: str = "choose another --out") -> None:
    """Raise unless writing a new output at ``final`` destroys nothing uadc did not write (the error
    ends with ``remedy``: what the user can change)."""
    check_no_phantom_parent(final)
    if not final.exists() and not final.is_symlink():
        return
    if final.is_symlink():   # replacing it would replace the link, not the folder it names: refused either way
        raise UadcError(f"output path is a symbolic link: {final}; give the folder it points to, or another path")
    if not final.is_dir():
        raise UadcError(f"output path exists and is not a folder: {final}")
    if not any(final.iterdir()):
        return
    if not is_output_dir(final):
        raise UadcError(f"output folder {final} exists and was not written by uadc; "
                        f"{remedy} (nothing was changed)")
    listed = files_added_to_artifact(final)   # None: no artifact.json of uadc's (another tool's named so: a user's)
    sweep = is_marker(final / GRID_FILES[0], OUTPUT_MARKERS[GRID_FILES[0]])   # sweep.json; else compare.json
    grid = listed is None and (sweep or is_marker(final / "compare.json", OUTPUT_MARKERS["compare.json"]))
    if listed is None and not grid and not is_marker(final / QAT_JSON, OUTPUT_MARKERS[QAT_JSON]):
        # a report.json copied among a user's notes and photos made the folder uadc's: replaced whole by --force
        raise UadcError(f"output folder {final} holds a uadc report but no {MANIFEST_FILE} of uadc's: not an output "
                        f"uadc replaces; {remedy} (nothing was changed)")
    added = listed if listed is not None else grid_added(final, sweep) if grid else files_added(final, {QAT_FILE, QAT_JSON})
    if added:   # a user's images and scripts beside the artifact went with it, without a word
        what = f"files its {MANIFEST_FILE} does not list" if listed is not None else "files no uadc step writes there"
        raise UadcError(f"output folder {final} holds {what} ({added[0]}{f' and {len(added) - 1} more' * (len(added) > 1)}"
                        f"): move them out first, or {remedy} (nothing was changed)")
    if not replace:
        raise UadcError(f"output folder {final} exists; pass --force (force=True) to replace it")


@contextlib.contextmanager
def file_lock(target: Path, timeout: float = -1, inside: bool = False) -> Iterator[None]:
    """Serialise writers of ``target`` across processes (a lock file beside it, named after the real
    path: ``out``, ``./out/`` and a link to it share one lock; ``.`` is not ``..lock``). ``inside``: a
    folder kept in place (predict's ``--out``) whose parent this user cannot write holds its lock itself
    (a service's writable /srv/qc/line1 under a root-owned /srv/qc was refused)."""
    from filelock import FileLock, Timeout

    target = Path(os.path.realpath(target))
    lock_file = target.parent / f".{os.fsdecode(os.fsencode(target.name)[:255 - len('..lock')])}.lock"
    try:
        check_writable(target.parent)   # else filelock retries a lock it can never create, forever
    except UadcError:
        if not (inside and target.is_dir()):
            raise
        check_writable(target)
        lock_file = target / f".{LOCK_INSIDE}"
    ensure_dir(lock_file.parent)
    lock = FileLock(str(lock_file), timeout=timeout)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if timeout == 0:
                raise
            logging.getLogger("uadc").info("waiting for another uadc process writing %s", target)   # it waited mute
            lock.acquire()
    except Timeout:
        raise UadcError(f"{target} is being written by another uadc process") from None
    except OSError as exc:
        raise UadcError(f"cannot lock {target}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces ``final`` in one rename.

    ``final`` must be absent, empty or a uadc output folder (and ``replace`` true); otherwise
    UadcError before anything is written. On failure the temp folder is removed and ``final``
    is untouched."""
    final = Path(final).absolute()
    check_replaceable(final, replace)
    with replaced_dir(final, lambda: check_replaceable(final, replace)) as tmp:   # again, under the lock
        yield tmp


@contextlib.contextmanager
def replaced_dir(final: Path, check: Callable[[], Any] | None = None, io_errors: bool = True) -> Iterator[Path]:
    """:func:`atomic_dir` for a folder the caller has judged replaceable (a compile's pass dumps:
    ``check_dump_dir``); ``check`` runs again under the lock. ``io_errors``: an OSError in the block is
    "cannot write ``final``" (else it is the block's own: a pass's missing file)."""
    final = Path(final).absolute()
    ensure_dir(final.parent)
    check_writable(final.parent)
    with file_lock(final):
        if check is not None:
            check()
        clean_stale_temps(final.parent)
        tmp = _tmp_name(final)
        tmp.mkdir()
        try:
            yield tmp
        except OSError as exc:  # disk full, quota, ...: one line, and the temp is gone
            shutil.rmtree(tmp, ignore_errors=True)
            if not io_errors:
                raise
            raise UadcError(f"cannot write {final}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Ctrl-C / SIGTERM held over the swap and the old folder's removal: between the renames both versions
        # sat in temps the next writer deleted, and a stop in the removal said "nothing was written"
        with signals_deferred():
            _swap_in(tmp, final)


def _swap_in(tmp: Path, final: Path) -> None:
    old = None
    try:
        if final.exists() and exchange_paths(tmp, final):   # one step: a kill -9 between two renames left
            old = tmp                                        # no folder, and both in temps the next writer removed
        elif final.exists():
            old = _tmp_name(final)
            os.replace(final, old)
            os.replace(tmp, final)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        raise UadcError(f"cannot write {final}: {exc.strerror or exc}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_files(final: Path, then: Callable[[], Any] | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final``; on success each file in it moves to the same
    relative path under ``final`` (created if need be; other files there stay), then ``then()``
    runs (predict's tables), with Ctrl-C / SIGTERM held until both are done. On failure or
    interruption before that the temp folder is removed and ``final`` is untouched: a run stopped
    half-way leaves none of the files it added one by one (predict's overlays)."""
    final = Path(final)
    made = not final.parent.exists()   # removed again, if still empty, when nothing could be written
    ensure_dir(final.parent)
    clean_stale_temps(final.parent)
    tmp = _tmp_name(final)
    tmp.mkdir()
    done = False
    try:
        yield tmp
        with signals_deferred():   # moved one by one: an interrupt in between mixed two runs
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                dest = final / f.relative_to(tmp)
                try:
                    ensure_dir(dest.parent)
                    os.replace(f, dest)
                except OSError as exc:   # ``final`` a link to another disk: no rename across, copy it in
                    if exc.errno != errno.EXDEV:
                        raise UadcError(f"cannot write {dest}: {exc.strerror or exc}") from None
                    atomic_write_bytes(dest, f.read_bytes())
            if then is not None:
                then()
        done = True
    except OSError as exc:  # disk full, quota, ...: one line
        raise UadcError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not done:
            with contextlib.suppress(OSError):
                final.parent.rmdir()


PathArg = Union[str, os.PathLike[str]]   # a path argument of the public API, as as_path takes it


def as_path(value: Any, name: str, optional: bool = False) -> Path | None:
    """An API path argument: a non-empty str or os.PathLike (or None when ``optional``), else one
    UadcError line rather than pathlib's TypeError from deep inside."""
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise UadcError(f"{name}: expected a path, got {type(value).__name__} {value!r:.60}")

