"""A deployment bundle: a copy of an artifact with only what a line runs.

An artifact folder carries the regression gate's files next to the model (golden inputs and
outputs, their FP32 reference model: about nine tenths of an INT8 artifact's bytes). A line box
needs the model, ``artifact.json`` and what the target's own files are (``build_engine.sh`` and
the calibration cache of a TensorRT bundle, the reports). ``bundle`` verifies the artifact,
copies every listed file but the golden ones, and writes a manifest of its own that records the
source manifest's sha256 and what was left out. ``uadc verify BUNDLE --golden ARTIFACT`` still
judges a bundle against the full artifact's golden set.

Imports only uadc.core: no torch, no ONNX.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from uadc.core.constants import GOLDEN_FILES, MANIFEST_FILE, REPORT_FILE
from uadc.core.errors import UadcError
from uadc.core.hashing import sha256_file
from uadc.core.io import JsonResult, PathArg, as_path, atomic_dir, is_output_dir, read_json
from uadc.core.numbers import flags
from uadc.core.manifest import check_outside_artifacts, read_manifest, rebuilt_on_device, write_manifest

log = logging.getLogger(__name__)


@dataclass
class BundleResult(JsonResult):
    """Where the bundle was written and what it holds (relative paths, bytes)."""

    path: Path
    source: Path
    files: list[str]   # those its artifact.json lists (and hashes); bytes count artifact.json too
    left_out: list[str]
    unlisted: list[str] = field(default_factory=list)   # files in the source that its manifest does not list
    bytes: int = 0
    source_bytes: int = 0

    def summary_line(self) -> str:
        return (f"{self.path}: {len(self.files)} files and {MANIFEST_FILE}, {self.bytes / 1e6:.1f} MB (the artifact: "
                f"{self.source_bytes / 1e6:.1f} MB); left out: {', '.join(self.left_out) or 'nothing'}"
                + (f"; not copied (not in its {MANIFEST_FILE}): {', '.join(self.unlisted)}" if self.unlisted else ""))

    def to_dict(self) -> dict:
        return {"path": str(self.path), "source": str(self.source), "files": self.files, "left_out": self.left_out,
                "unlisted": self.unlisted, "bytes": self.bytes, "source_bytes": self.source_bytes}


def _absolute(path: Path) -> Path:
    """``path`` absolute, its ``..`` folded where that names the same folder (not past a link); a path not
    made yet (``--out ../new/B``) by its deepest folder that exists."""
    normed, probe = Path(os.path.abspath(path)), path
    while not os.path.lexists(probe) and probe.name not in ("", ".", ".."):   # `new/..`: stops at a missing ..,
        probe = probe.parent                                                      # which samefile refuses below
    try:
        return normed if os.path.samefile(os.path.abspath(probe), probe) else path.absolute()
    except OSError:
        return path.absolute()


def _check_apart(source: Path, out: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UadcError(f"--out {out} overlaps the artifact {source}: choose a folder outside it")


def _check_not_an_artifact(out: Path) -> None:
    """``--force`` replaces an earlier bundle, never another uadc output: a compiled artifact (its golden set,
    its reports), a sweep's or a comparison's folder (every cell's artifact)."""
    if out.is_symlink() or not out.is_dir() or not any(out.iterdir()):
        return   # a file or a link: refused where the bundle is written
    doc = read_json(out / MANIFEST_FILE, "artifact manifest") if (out / MANIFEST_FILE).is_file() else None
    if isinstance(doc, dict) and "bundle" in doc:
        return
    if doc is not None or is_output_dir(out):
        what = "a compiled artifact" if doc is not None else "a uadc output folder (a sweep, a comparison, a QAT run)"
        raise UadcError(f"--out {out}: {what}, not a bundle; bundles replace only earlier bundles "
                        f"(choose another --out)")


def bundle(artifact: PathArg, out: PathArg, *, force: bool = False) -> BundleResult:
    """Write the deployment copy of ``artifact`` to ``out`` (atomically; ``force`` replaces an
    earlier uadc output there). The artifact is verified against its manifest first. Torch-free:
    an edge box without torch runs it (``uadc.bundle`` is this function)."""
    flags(force=force)
    source, out = as_path(artifact, "bundle: artifact"), as_path(out, "bundle: out")
    manifest = read_manifest(source)             # every listed file present and unchanged
    manifest.check_model_file()                  # and artifact.json the one compile wrote for its model
    _check_apart(source, Path(out))
    check_outside_artifacts(Path(out), below=True)   # a later compile of that artifact deleted it, without --force
    _check_not_an_artifact(Path(out))
    final, source = _absolute(Path(out)), _absolute(source)   # now: `--out .` is swapped away below, and the cwd with it
    # the device's build (an engine rebuilt there, an older uadc's listed timing cache): not the artifact's
    device = [rel for rel, digest in manifest.files.items() if rebuilt_on_device(source, rel, digest)]
    keep = sorted(rel for rel in manifest.files if rel not in GOLDEN_FILES and rel not in device)
    left_out = sorted(set(manifest.files) - set(keep) - set(device))
    earlier = (manifest.bundle or {}).get("left_out") if isinstance(manifest.bundle, dict) else None
    earlier = [x for x in earlier if isinstance(x, str)] if isinstance(earlier, list) else []   # a bundle's bundle
    provenance = {"source_manifest_sha256": sha256_file(source / MANIFEST_FILE),
                  "left_out": sorted(set(left_out) | set(earlier))}
    with atomic_dir(Path(out), replace=force) as tmp:
        for rel in keep:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, tmp / rel)   # keeps build_engine.sh executable
            if sha256_file(tmp / rel) != manifest.files[rel]:
                raise UadcError(f"artifact {source}: {rel} changed while it was being copied; nothing was written")
        write_manifest(tmp, dataclasses.replace(manifest, files={}, bundle=provenance, folder=None, unlisted=[]))
    _warn_of_a_failed_gate(source, manifest.files, manifest.bundle is not None)
    if manifest.thresholds is None:   # it shipped without a word; its first predict on the line refused it
        log.warning("%s has no operating thresholds (compiled without validation normals): `uadc predict` and "
                    "Detector refuse the bundle; it serves raw scores only", source)
    # left out: a bundle's bundle's too (it said "nothing"); the path absolute, as compile's
    device = [rel for rel in device if (source / rel).is_file()]
    return BundleResult(final, source, keep, sorted([*provenance["left_out"], *device]), list(manifest.unlisted),
                        sum((final / rel).stat().st_size for rel in [*keep, MANIFEST_FILE]),
                        sum((source / rel).stat().st_size for rel in [*manifest.files, MANIFEST_FILE]
                            if rel not in device and (source / rel).is_file()))


def _warn_of_a_failed_gate(source: Path, files: dict, is_bundle: bool) -> None:
    """A bundle of an artifact that failed its own regression gate at compile went out without a word."""
    report = read_json(source / REPORT_FILE, "report") if REPORT_FILE in files else None
    gate = ((report or {}).get("verification") or {}).get("gate") if isinstance(report, dict) else None
    if isinstance(gate, dict) and gate.get("passed") is False:
        first = (gate.get("failures") or ["a figure out of budget"])[0]
        log.warning("%s failed its own regression gate at compile (%s): the bundle ships it as compiled; "
                    "`uadc verify %s%s` lists the figures", source, first, source,
                    " --golden FULL_ARTIFACT" if is_bundle else "")   # a bundle holds no golden set
