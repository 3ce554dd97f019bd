"""The report files of ``uadc verify`` / ``uadc diff`` before and after a run: which paths they may
replace, and the error document a stopped run leaves there. Imports neither pydantic nor torch: the
runtime-only install's ``verify --json`` stops for want of them, and must still replace an earlier PASS."""

from __future__ import annotations

import os
import re
from pathlib import Path

from uadc.core.constants import VERIFY_SCHEMA
from uadc.core.errors import UadcError
from uadc.core.io import atomic_write_text, check_own_file, to_json
from uadc.core.manifest import check_outside_artifacts

_OWN_JSON = re.compile(r'\{\s*"schema": \d+,\s*"kind": "(verify|diff)"')
_OWN_MARKDOWN = re.compile(r"# uadc (verify|diff): ")


def _same_file(a: Path, b: Path) -> bool:
    """One file by two spellings: `..`, a link, a hard link."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):   # a link loop: refused where the report is written
        return False


def check_report_paths(json_out: Path | None, md_out: Path | None) -> None:
    """Before any work: ``--json`` / ``--markdown`` may replace an earlier verify/diff report of
    their kind, never another file (an artifact's model.onnx, a user's notes) or each other."""
    if json_out and md_out and _same_file(Path(json_out), Path(md_out)):   # `./d/../r.json` too: the JSON lost
        raise UadcError(f"--json and --markdown name the same file: {json_out}")
    if str(md_out) == "-":
        raise UadcError("--markdown -: the Markdown report is on stdout already (or `--json -` puts the JSON there)")
    if json_out and str(json_out) != "-":   # `-`: stdout
        check_own_file(Path(json_out), lambda head: bool(_OWN_JSON.match(head)),
                       "uadc verify or diff as a --json report")
    if md_out:
        check_own_file(Path(md_out), lambda head: bool(_OWN_MARKDOWN.match(head)),
                       "uadc verify or diff as a --markdown report")
    for what, out in (("--json", json_out), ("--markdown", md_out)):   # a report in an artifact folder stopped its
        if out and str(out) != "-":                                     # recompile (a file its manifest does not list)
            check_outside_artifacts(Path(out), below=True, what=what)


def error_document(kind: str, message: str, code: int) -> str:
    """The JSON report of a run that stopped, the same at ``--json FILE`` and ``--json -``."""
    return to_json({"schema": VERIFY_SCHEMA, "kind": kind, "passed": False, "exit_code": code, "error": message})


def write_error_reports(kind: str, json_out: Path | None, md_out: Path | None, message: str, code: int) -> None:
    """A run that stopped (user error, Ctrl-C) replaces the earlier reports at ``--json`` /
    ``--markdown``: a pipeline reading them after exit 2 must not find the last run's PASS."""
    if json_out and str(json_out) != "-":
        atomic_write_text(Path(json_out), error_document(kind, message, code))
    if md_out:
        verdict = "REGRESSION" if message.startswith("REGRESSION: ") else "ERROR"   # a NaN candidate: no mistake
        atomic_write_text(Path(md_out), f"# uadc {kind}: {verdict}\n\n{message} (exit {code})\n")
