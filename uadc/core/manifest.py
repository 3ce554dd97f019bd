"""``artifact.json``: what an artifact folder holds and how to run it, readable without torch.

A manifest names the model, its input and preprocessing, the categories, the operating
thresholds with their normalisation constants, and the sha256 of every file in the folder.
``read_manifest(folder)`` checks those hashes: a file changed after compile is a one-line
``UadcError`` (exit 2), never a silently different model. Files that appear later and are not
listed (``model.engine`` built on the device from the listed ``model.onnx``) are not refused;
``Manifest.unlisted`` names them.

Imports only the standard library, numpy and uadc.core, so ``uadc.runtime`` can use it on an
edge box without PyTorch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from uadc.core.constants import (ARTIFACT_PRECISIONS, DEPLOY_METADATA, DEVICE_FILES, ENGINE_FILE, ENGINE_SOURCE_SUFFIX,
                                 INPUT_NAME, MANIFEST_FILE, MANIFEST_SCHEMA, MODEL_FILE, OUTPUT_NAMES, PRED_OUTPUTS, RUNTIMES, TARGET_RUNTIMES,
                                 TMP_TAG)
from uadc.core.errors import UadcError
from uadc.core.hashing import sha256_file
from uadc.core.io import JsonResult, PathArg, as_path, atomic_write_json, parse_json
from uadc.core.names import same_name
from uadc.core.numbers import flags

MAX_MANIFEST_BYTES = 16 << 20
RESIZE_FILTERS = ("bilinear", "nearest", "bicubic")   # PIL filters the runtime resizes with
MAX_IMAGE_SIZE = 8192
ONNX_DOMAINS = frozenset(("", "ai.onnx", "com.microsoft"))   # the operator sets of the models compile writes
_EPS = 1e-12


def _finite(x: Any, what: str, positive: bool = False) -> float:
    """A manifest number: NaN or inf (valid JSON to Python) would decide silently, e.g. a NaN
    threshold passes every defect; a zero std would divide by zero."""
    v = float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan   # not "0.5", not true
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{what} must be a finite{' positive' if positive else ''} number, got {x!r}")
    return v


def _in(x: Any, what: str, low: float, high: float) -> float:
    v = _finite(x, what)
    if not low <= v <= high:
        raise ValueError(f"{what} must be {low:g} to {high:g}, got {x!r}")
    return v


def _whole(x: Any, what: str, low: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise ValueError(f"{what} must be a whole number >= {low}, got {x!r}")
    return x


def normal_span(value: float, low: float, high: float) -> float:
    """What a normalised score's [0, 1] spans: the validation values' range; with one value (or all equal),
    the threshold's own size, so that half the threshold is 0, the threshold 0.5 and 1.5 times it 1 (a
    span of 0 made the score a step, 0 or 1, for every category of one validation normal)."""
    size = max(abs(value), abs(low), abs(high))
    width = high - low   # normals a few float32 steps apart are no spread either
    return width if width > max(5e-7 * size, _EPS) else max(size, _EPS)


@dataclass(frozen=True)
class Threshold:
    """One operating threshold (raw model units) and its min-max normalisation (anomalib's
    convention): ``normalize(threshold) == 0.5`` and [0, 1] spans ``[low, high]``, the range of
    the validation normals' values, clipped beyond."""

    value: float            # raw score / map value at which "defective" starts
    low: float              # smallest validation value
    high: float             # largest validation value
    quantile: float         # quantile level of the validation values that gave ``value``
    n: int                  # validation values it rests on (images, or pixels)
    span: float | None = None   # what [0, 1] spans (normal_span); None: an artifact of before it, high - low

    def scale(self) -> float:
        """The normalisation's span, as this artifact's graph (``pred_score``) was built with it."""
        return self.span if self.span is not None else max(self.high - self.low, _EPS)

    def normalize(self, x: Any) -> np.ndarray:
        return np.clip((np.asarray(x, np.float32) - self.value) / self.scale() + 0.5, 0.0, 1.0).astype(np.float32)

    def decide(self, x: Any) -> np.ndarray:
        """True where ``x`` (raw) is at or above the threshold (a defect)."""
        return np.asarray(x) >= self.value

    @classmethod
    def from_dict(cls, d: dict) -> "Threshold":
        t = cls(*(_finite(d[k], f"threshold {k}") for k in ("value", "low", "high")),
                _in(d["quantile"], "threshold quantile", 0, 1), _whole(d["n"], "threshold n"),
                None if d.get("span") is None else _finite(d["span"], "threshold span", positive=True))
        if t.low > t.high:
            raise ValueError(f"threshold low {t.low!r} is above its high {t.high!r}")
        return t


@dataclass(frozen=True)
class CategoryThresholds:
    """The image and pixel operating thresholds of one category (or of all together: ``global``)."""

    image: Threshold        # on the image score
    pixel: Threshold        # on anomaly-map values (the mask)

    @classmethod
    def from_dict(cls, d: dict) -> "CategoryThresholds":
        return cls(Threshold.from_dict(d["image"]), Threshold.from_dict(d["pixel"]))


GLOBAL = "global"           # key of the thresholds over all categories' validation normals together
# what to do when no normals were held out for thresholds (a single training image has none to spare)
NO_VALIDATION_ADVICE = ("give data.val (defect-free images per category), or set data.val_fraction > 0 where it "
                        "is 0 (a category with one training image has none to hold out)")


@dataclass(frozen=True)
class Thresholds(JsonResult):
    """Label-free operating points of one artifact, computed on its own validation outputs."""

    false_alarm_rate: float
    estimator: str                              # how the quantile was estimated (README)
    categories: dict[str, CategoryThresholds]
    global_: CategoryThresholds                 # serialised as "global"
    validation: dict[str, int] = field(default_factory=dict)   # category -> validation images
    image_spread: dict | None = None            # the pooled log spread of image scores (evaluation.thresholds)

    def get(self, category: str | None = None) -> CategoryThresholds:
        """A category's thresholds; ``None`` gives the global ones (category unknown)."""
        if category is None or (category == GLOBAL and GLOBAL not in self.categories):   # a category may be named so
            return self.global_
        if not isinstance(category, str):   # a list: "unhashable type" from the lookup below
            raise UadcError(f"category: expected a category's name or None, got {type(category).__name__} "
                            f"{category!r:.60}")
        category = next((c for c in self.categories if same_name(c, category)), category)
        if category not in self.categories:
            raise UadcError(f"unknown category {category!r}; this artifact knows "
                            f"{', '.join(self.categories) or 'none'} (or omit it for the global threshold)")
        return self.categories[category]

    def to_dict(self) -> dict:
        return {"false_alarm_rate": self.false_alarm_rate, "estimator": self.estimator,
                "categories": {c: asdict(t) for c, t in self.categories.items()},
                GLOBAL: asdict(self.global_), "validation": dict(self.validation),
                **({"image_spread": self.image_spread} if self.image_spread else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        return cls(_in(d["false_alarm_rate"], "false_alarm_rate", 0, 1), str(d["estimator"]),
                   {c: CategoryThresholds.from_dict(t) for c, t in d["categories"].items()},
                   CategoryThresholds.from_dict(d[GLOBAL]),
                   {k: _whole(v, "validation count") for k, v in d.get("validation", {}).items()},
                   d.get("image_spread"))


@dataclass(frozen=True)
class Preprocessing:
    """What the training loader does to a file (uadc.data.mvtec.load_image + normalisation)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"        # PIL filter; skipped when the image already has the size
    color: str = "RGB"              # PIL convert() mode; grayscale is replicated to 3 channels
    scale: float = 1 / 255          # uint8 -> [0, 1]
    layout: str = "NCHW"

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        size = _whole(d["image_size"], "image_size", 1)
        if size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be 1 to {MAX_IMAGE_SIZE}, got {size}")
        mean, std = tuple(_finite(x, "mean") for x in d["mean"]), tuple(_finite(x, "std", True) for x in d["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        pre = cls(size, mean, std, str(d.get("resize", "bilinear")), str(d.get("color", "RGB")),
                  _finite(d.get("scale", 1 / 255), "scale", positive=True), str(d.get("layout", "NCHW")))
        for key, value, allowed in (("resize", pre.resize, RESIZE_FILTERS), ("color", pre.color, ("RGB",)),
                                    ("layout", pre.layout, ("NCHW",))):
            if value not in allowed:
                raise ValueError(f"{key} must be {' or '.join(allowed)}, got {value!r}")
        if abs(pre.scale - 1 / 255) > 1e-12:   # the runtime, as the training loader, divides by 255
            raise ValueError(f"scale must be 1/255, got {pre.scale!r}")
        return pre


@dataclass
class Manifest(JsonResult):
    uadc_version: str
    recipe: str
    recipe_hash: str
    target: str
    precision: str
    runtime: str
    preprocessing: Preprocessing
    categories: list[str]
    thresholds: Thresholds | None = None
    model_file: str = MODEL_FILE
    input_name: str = INPUT_NAME
    input_shape: list[Any] = field(default_factory=list)      # ["batch", 3, H, W]
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    postprocess: dict | None = None         # in-graph pred_* outputs: how the category is chosen
    files: dict[str, str] = field(default_factory=dict)       # relative path -> sha256
    schema: int = MANIFEST_SCHEMA
    bundle: dict | None = None              # a deployment bundle's provenance (uadc.pipeline.bundle)
    folder: Path | None = None              # where it was read from (not serialised)
    unlisted: list[str] = field(default_factory=list)         # files present but not listed

    def to_dict(self) -> dict:
        return {"schema": self.schema, "uadc_version": self.uadc_version, "recipe": self.recipe,
                "recipe_hash": self.recipe_hash, "target": self.target, "precision": self.precision,
                "runtime": self.runtime, "model_file": self.model_file,
                "input": {"name": self.input_name, "shape": list(self.input_shape), "dtype": "float32"},
                "outputs": list(self.outputs), "preprocessing": asdict(self.preprocessing),
                "categories": list(self.categories),
                "thresholds": self.thresholds.to_dict() if self.thresholds else None,
                "postprocess": self.postprocess, "files": dict(sorted(self.files.items())),
                **({"bundle": self.bundle} if self.bundle else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        inp = d.get("input") or {}
        m = cls(str(d["uadc_version"]), str(d["recipe"]), str(d["recipe_hash"]), str(d["target"]),
                   str(d["precision"]), str(d["runtime"]), Preprocessing.from_dict(d["preprocessing"]),
                   list(d["categories"]), Thresholds.from_dict(d["thresholds"]) if d.get("thresholds") else None,
                   str(d.get("model_file", MODEL_FILE)), str(inp.get("name", INPUT_NAME)), list(inp.get("shape", [])),
                   list(d.get("outputs", OUTPUT_NAMES)), d.get("postprocess"), dict(d.get("files", {})),
                   _whole(d.get("schema", MANIFEST_SCHEMA), "schema", 1), bundle=d.get("bundle"))
        size = m.preprocessing.image_size
        if m.input_shape and m.input_shape[1:] != [3, size, size]:
            raise ValueError(f"input shape {m.input_shape} does not take {size} x {size} RGB images")
        if m.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be {', '.join(RUNTIMES)}, got {m.runtime!r}")
        runs_on = next((r for prefix, r in TARGET_RUNTIMES.items() if m.target.startswith(prefix)), None)
        if runs_on != m.runtime:   # an edited runtime chose another backend and silenced its warnings
            raise ValueError(f"target {m.target!r} does not run on {m.runtime}" if runs_on else
                             f"unknown target {m.target!r}")
        if m.precision not in ARTIFACT_PRECISIONS:
            raise ValueError(f"precision must be {', '.join(ARTIFACT_PRECISIONS)}, got {m.precision!r}")
        if m.postprocess is not None and not isinstance(m.postprocess, dict):
            raise ValueError(f"postprocess must be a mapping or null, got {m.postprocess!r:.60}")
        cats = d["categories"]
        if not isinstance(cats, list) or not all(isinstance(c, str) and c for c in cats) or len(set(cats)) != len(cats):
            raise ValueError(f"categories must be a list of distinct names, got {cats!r:.100}")
        if m.thresholds and set(m.thresholds.categories) != set(cats):
            raise ValueError(f"thresholds are for {sorted(m.thresholds.categories)}, categories are {sorted(cats)}")
        return m

    def again(self) -> str:
        """What makes the folder whole again: a bundle (on a line PC) is made again from its artifact."""
        return "bundle it again from its artifact (or restore the file)" if self.bundle else \
            "compile the artifact again (or restore the file)"

    def check_model_input(self, name: str, shape: Sequence[Any]) -> None:
        """The model's own input (from its runtime) is what the manifest says it feeds."""
        size = self.preprocessing.image_size
        if name != self.input_name or list(shape)[1:] != [3, size, size]:
            raise UadcError(f"{(self.folder or Path('.')) / MANIFEST_FILE} says the model takes {self.input_name!r} "
                            f"[batch, 3, {size}, {size}], but {self.model_file} takes {name!r} {list(shape)}: "
                            f"the manifest was edited; {self.again()}")

    def check_model_metadata(self, props: dict[str, str]) -> None:
        """The model file carries the essentials compile wrote into it (``uadc.deploy``): another
        model put in its place (its sha256 updated too) would be decided at these thresholds."""
        try:
            theirs = parse_json(props.get(DEPLOY_METADATA) or "null")
        except ValueError:
            theirs = None
        mine = json.loads(json.dumps(self.essentials()))
        if theirs != mine:
            differ = sorted(k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k])
            raise UadcError(f"{(self.folder or Path('.')) / self.model_file} is not the model {MANIFEST_FILE} was "
                            f"written for (its {DEPLOY_METADATA} metadata differs: {', '.join(differ)}); "
                            f"{self.again()}")
        wrote = [*OUTPUT_NAMES, *(PRED_OUTPUTS if self.postprocess else ())]
        if list(self.outputs) != wrote:   # informational only, and so edited unseen: a line read pred_* gone
            raise UadcError(f"{(self.folder or Path('.')) / MANIFEST_FILE}: outputs {list(self.outputs)!r:.120} are "
                            f"not the model's ({', '.join(wrote)}); {self.again()}")

    def check_model_file(self) -> None:
        """:meth:`check_model_metadata` on the folder's model file, read here (``uadc verify``, ``diff``,
        ``bundle`` and every runtime judged an edited manifest's thresholds, which predict refused)."""
        self.check_model_metadata(model_metadata((self.folder or Path(".")) / self.model_file))

    def check_engine(self, engine: Path) -> str | None:
        """A ``model.engine`` built from another ``model.onnx`` (a new artifact's files copied over a device
        folder that kept its engine) ran with this manifest's thresholds: refused when build_engine.sh's
        record says so; the warning to give when nothing records it (an engine built by hand)."""
        listed, model = self.files.get(Path(engine).name), self.files.get(self.model_file)
        if listed is not None and sha256_file(engine) == listed:   # built at compile (--build-engine), unchanged:
            return None                                             # a record beside it is another engine's
        built = _engine_record(Path(engine))
        record = Path(engine).with_name(Path(engine).name + ENGINE_SOURCE_SUFFIX)
        if built is None:
            return (f"{engine}: nothing records which {self.model_file} it was built from "
                    f"({'an empty' if record.is_file() else 'no'} {record.name}, "
                    f"which build_engine.sh writes); if {self.model_file} changed since, rerun build_engine.sh")
        if model is not None and built != model:
            raise UadcError(f"{engine} was built from another {self.model_file} (sha256 {built[:12]}, this "
                            f"artifact's is {model[:12]}): rerun build_engine.sh on this device")
        return None

    def essentials(self) -> dict:
        """What goes into the ONNX ``metadata_props`` (``uadc.deploy``): enough to run the
        model and decide without the folder's other files."""
        d = self.to_dict()
        return {k: d[k] for k in ("schema", "uadc_version", "recipe_hash", "target", "precision", "input",
                                  "preprocessing", "categories", "thresholds", "postprocess")}


def model_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (through onnx where it is installed, else ONNX Runtime's reader)."""
    try:
        import onnx
    except ImportError:   # the torch-free runtime may run without onnx: the same checks, from the wire format
        import onnxruntime as ort

        from uadc.core.onnx_wire import graph_facts
        try:
            _check_graph(path, *graph_facts(path))
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except UadcError:
            raise
        except Exception as exc:  # noqa: BLE001 - the reader's ValueError, ORT's InvalidProtobuf and others
            raise UadcError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        return dict(sess.get_modelmeta().custom_metadata_map)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and others: a damaged file
        raise UadcError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    _check_graph(path, any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer),
                 {n.domain for n in model.graph.node})
    return {p.key: p.value for p in model.metadata_props}


def _check_graph(path: Path, external: bool, domains: set[str]) -> None:
    if external:   # uadc writes none; `bundle` shipped such a model without the file it reads (or one a link led to)
        raise UadcError(f"{path}: keeps weights in external data files, which uadc never writes: not the model "
                        f"compile wrote")
    foreign = sorted(domains - ONNX_DOMAINS)
    if foreign:   # a custom operator: bundle shipped it (exit 0) and the line's runtime could not load it
        raise UadcError(f"{path}: uses operators of domain {foreign[0]!r}, which uadc never writes: not the model "
                        f"compile wrote")


def check_outside_artifacts(out: Path, below: bool = False, what: str = "--out") -> None:
    """Refuse an output folder in an artifact folder (one holding ``artifact.json``); ``below``: only in
    one strictly above ``out`` (``out`` itself may be an artifact, to be replaced)."""
    out = Path(out)
    # `ART/../preds` is beside ART, not in it (its parents as written held ART); a link is where it leads too
    try:
        real = out.resolve().parents
    except (OSError, RuntimeError):   # a link loop: its folder cannot be made either, and says so there
        real = ()
    above = (*Path(os.path.normpath(out.absolute())).parents, *real)
    inside = next((d for d in (() if below else (out,)) + above if (d / MANIFEST_FILE).is_file()), None)
    if inside is not None:
        where = "an artifact folder; choose another folder" if inside == out else \
            f"inside the artifact folder {inside}; choose a folder outside it"
        raise UadcError(f"{what} {out}: {where}")


def infer_category(path: Path, categories: Sequence[str]) -> str | None:
    """The category named by the nearest folder of ``path`` (``.../bottle/test/x.png`` ->
    ``bottle``; a relative path's working folder counts: ``uadc predict ART .`` in ``bottle/test``);
    ``None`` when no folder is a known category (the global thresholds apply). The path is
    normalised first: ``stripes/../../odd/x.png`` is not in ``stripes`` (links are not followed: a
    linked folder's own name counts). :func:`named_in` says whether the path as given names it."""
    for part in reversed(Path(os.path.normpath(Path(path).absolute())).parts[:-1]):
        found = next((c for c in categories if same_name(c, part)), None)
        if found is not None:
            return found
    return None


def named_in(path: Path, category: str) -> bool:
    """Whether ``path`` as written (not its working folder) names ``category``: ``cam1/x.png`` run in a
    folder named ``gray`` was judged a ``gray`` image without a word."""
    return any(same_name(category, part) for part in Path(os.path.normpath(path)).parts[:-1])


def _engine_record(engine: Path) -> str | None:
    """The sha256 of the model.onnx that build_engine.sh built ``engine`` from (its record), if one says."""
    record = engine.with_name(engine.name + ENGINE_SOURCE_SUFFIX)
    try:
        # an empty record (a build stopped as it wrote it) records nothing
        return (record.read_text(encoding="ascii", errors="replace").strip()[:64] or None) if record.is_file() else None
    except OSError as exc:
        raise UadcError(f"{record}: cannot be read ({exc.strerror})") from None


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
                  and TMP_TAG not in p.name and not p.name.startswith(".uadc"))


def _device_file(rel: str) -> bool:
    """The device's files beside the engine (timing cache, record, implicit engine): each build there
    rewrites them, so no hash of them holds (an older uadc listed them)."""
    return rel in DEVICE_FILES and rel != ENGINE_FILE


def rebuilt_on_device(folder: Path, rel: str, digest: str) -> bool:
    """A listed file whose hash no longer applies: a device file, or an engine compile built that
    build_engine.sh rebuilt on the device (``check_engine`` reads its record instead)."""
    return _device_file(rel) or (rel == ENGINE_FILE and _engine_record(folder / rel) is not None
                                 and (folder / rel).is_file() and sha256_file(folder / rel) != digest)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Hash every file now in ``folder`` (but the device's) into the manifest and write ``artifact.json`` last."""
    folder = Path(folder)
    manifest.files = {rel: sha256_file(p) for p in _folder_files(folder)
                      if not _device_file(rel := p.relative_to(folder).as_posix())}
    return atomic_write_json(folder / MANIFEST_FILE, manifest.to_dict())


def read_manifest(folder: PathArg, verify: bool = True) -> Manifest:
    """The manifest of an artifact folder; with ``verify``, every listed file must exist and
    match its sha256 (one-line ``UadcError`` otherwise)."""
    folder = as_path(folder, "artifact")
    flags(verify=verify)   # verify="no" read as true
    if not folder.is_dir():
        raise UadcError(f"not an artifact folder: {folder} is a file; give the folder that holds its {MANIFEST_FILE}"
                        if folder.exists() else f"artifact folder not found: {folder}")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UadcError(f"{folder} has no {MANIFEST_FILE}: not a uadc artifact folder (or compiled by an older "
                        f"uadc; compile it again)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UadcError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a uadc manifest")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise UadcError(f"{path}: not a valid uadc manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    if manifest.schema > MANIFEST_SCHEMA:
        raise UadcError(f"{path}: manifest schema {manifest.schema} is newer than this uadc reads "
                        f"({MANIFEST_SCHEMA}); upgrade uadc")
    manifest.folder = folder
    for rel in (manifest.model_file, *manifest.files):   # even unverified, nothing is read from outside the folder
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise UadcError(f"{path}: file entry {rel!r} leaves the artifact folder")
        if any(len(os.fsencode(p)) > 255 for p in Path(rel).parts) or len(os.fsencode(rel)) > 4000:
            raise UadcError(f"{path}: file entry {rel[:60]!r}... is longer than a file name can be")   # OSError before
    if verify:
        verify_files(folder, manifest)
    listed = set(manifest.files)
    manifest.unlisted = [p.relative_to(folder).as_posix() for p in _folder_files(folder)
                         if p.relative_to(folder).as_posix() not in listed]
    return manifest


def verify_files(folder: Path, manifest: Manifest, only: Sequence[str] | None = None) -> None:
    """Every listed file (``only``: those of them) exists and matches its sha256."""
    if manifest.model_file not in manifest.files:
        raise UadcError(f"{folder / MANIFEST_FILE}: does not list {manifest.model_file}")
    for rel, digest in manifest.files.items():
        if only is not None and rel not in only:
            continue
        p = folder / rel
        if _device_file(rel):
            continue
        if not p.is_file():
            raise UadcError(f"artifact {folder}: {rel} is missing (listed in {MANIFEST_FILE})")
        if sha256_file(p) != digest and not rebuilt_on_device(folder, rel, digest):
            raise UadcError(f"artifact {folder}: {rel} does not match its sha256 in {MANIFEST_FILE} (changed after "
                            f"{'bundle' if manifest.bundle else 'compile'}); {manifest.again()}")
