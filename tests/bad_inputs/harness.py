"""Run one corpus case through the CLI and check its outcome: the exit code, one ``error:``
line and no traceback, and that nothing outside the case's intended output changed."""

from __future__ import annotations

from uadc.core.hashing import sha256_file
import os
import stat
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from click.testing import CliRunner, Result


@dataclass
class Env:
    """``d``: the case's own folder (the working directory); ``s``: the shared session fixture."""
    d: Path
    s: "Shared"
    immutable: list = field(default_factory=list)  # folders made immutable (chattr +i), undone after


@dataclass
class Shared:
    root: Path          # everything shared lives under here (checked for changes after every case)
    data: Path          # tiny synthetic MVTec-layout data
    recipe: Path        # tiny recipe (image_size 32, 1 epoch)
    art: Path           # artifacts root holding the trained checkpoint
    ckpt: Path          # art/<recipe>/checkpoint.pt
    nan_ckpt: Path      # the same with one NaN weight
    inf_ckpt: Path      # the same with one +Inf weight
    huge_ckpt: Path     # finite weights (a negative batch-norm variance) whose outputs are NaN
    onnx: Path          # a tiny valid ONNX model


@dataclass
class Case:
    id: str
    args: Callable[[Env], list[str]]
    code: int = 2
    msg: str | None = None            # substring of the one error line (exit 2) / of the output (exit 0/1)
    setup: Callable[[Env], None] | None = None
    allow: tuple[str, ...] = ()       # paths (relative to the case folder) that may change
    check: Callable[[Env, Result], None] | None = None  # success cases: the output is sound
    usage: bool = False               # a click usage error (exit 2, usage lines, then "error: ..." last)
    slow: bool = False                # runs an export/compile/training
    tags: tuple[str, ...] = field(default=())


def _sha(p: Path) -> str:
    return sha256_file(p)


def snapshot(root: Path, content: bool = True) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and (files) sha256 or size+mtime; links by target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode)
            elif st.st_size > (1 << 26) or not content:  # sparse "huge" files: metadata only
                out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_mode, _sha(p))
    return out


def diff(before: dict, after: dict, allow: tuple[str, ...] = ()) -> list[str]:
    def allowed(rel: str) -> bool:
        return any(rel == a or rel.startswith(a.rstrip("/") + "/") for a in allow)
    changes = [f"deleted {k}" for k in before.keys() - after.keys()]
    changes += [f"created {k}" for k in after.keys() - before.keys()]
    changes += [f"changed {k}" for k in before.keys() & after.keys() if before[k] != after[k]]
    return sorted(c for c in changes if not allowed(c.split(" ", 1)[1]))


def outcome_problems(case: Case, res: Result) -> list[str]:
    """What is wrong with the CLI's answer (empty when it is the promised one)."""
    problems = []
    text = res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(type(res.exception), res.exception, res.exception.__traceback__))
        problems.append(f"uncaught exception (a traceback for the user):\n{tb[-3000:]}")
    if "Traceback" in text:
        problems.append("'Traceback' in the output")
    if res.exit_code != case.code:
        problems.append(f"exit code {res.exit_code}, expected {case.code}")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if case.code == 2 and case.usage:
        if not lines or not lines[-1].startswith("error: ") or not lines[0].startswith("Usage: "):
            problems.append("a usage error is click's usage line, then one 'error: ...' line as every other error")
    elif case.code == 2:
        errors = [ln for ln in lines if ln.startswith("error: ")]
        if len(errors) != 1 or lines[-1] != errors[0]:
            problems.append(f"expected exactly one 'error: ...' line, last on stderr; got {lines[-3:]}")
        elif len(errors[0]) > 2000:   # as README promises, "error: " included
            problems.append(f"error line of {len(errors[0])} characters")
        elif case.msg and case.msg not in errors[0]:
            problems.append(f"error line lacks {case.msg!r}: {errors[0]}")
    elif case.msg and case.msg not in text:
        problems.append(f"output lacks {case.msg!r}")
    return problems


def run_cli(args: list[str]) -> Result:
    from uadc.cli import main
    return CliRunner().invoke(main, args)
