"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` so a file from
elsewhere can hold tensors and plain data, never code."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from uadc import __version__
from uadc.config.locations import without_locations
from uadc.config.recipe import ModelConfig, Recipe, recipe_from_dict
from uadc.config.yaml_file import dump_yaml
from uadc.core.constants import CHECKPOINT_FILE
from uadc.core.errors import UadcError, pickle_refusal
from uadc.core.hashing import sha256_stream
from uadc.core.io import atomic_save, atomic_write_text
from uadc.core.names import contained, same_name
from uadc.core.process import signals_deferred
from uadc.core.scoped import float32_default, streams_kept, warnings_ignored
from uadc.models import KDModel, build_model

log = logging.getLogger(__name__)

MAX_CHECKPOINT_BYTES = 4 << 30
ONE_CLASS_DIR = "one_class"      # <artifacts>/<recipe>/one_class/<category>/checkpoint.pt
RECIPE_COPY = "recipe.yaml"      # the trained recipe, beside its checkpoint (for people; uadc reads the checkpoint)


HEAD_KEYS = ("head", "score_reduction", "score_topk", "score_pool")  # weight-free head settings a checkpoint serves alike


def model_hash(recipe: Recipe, raw: bool = False) -> str:
    """Hash of what a checkpoint must agree with to be used (data and architecture), without where the
    files live: the demo in another venv's site-packages, or a moved project, is the same training
    (the data itself is compared by ``data_files`` when its folders moved). ``raw``: as uadc 0.2.0 hashed it
    at first, with the keys of a kNN term that is off."""
    return hashlib.sha256(json.dumps(_hashed(recipe, raw), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hashed(recipe: Recipe, raw: bool = False, folder: str | None = None) -> dict:
    """The data and model settings :func:`model_hash` reads (the first difference is named among them: a kNN
    key of a term that is off was named though it made no difference); where the data lives is ``folder``."""
    cfg = without_locations({k: recipe.cfg[k] for k in ("data", "model")}, folder)
    for knn in ("image_knn", "patch_knn"):   # off, its other keys build nothing: editing them forced a retraining
        if not raw and not (cfg["model"].get(knn) or {}).get("weight"):
            cfg["model"][knn] = ModelConfig.model_fields[knn].default_factory().model_dump(mode="json")
    return cfg


def _data_folders(recipe: Recipe) -> list[str]:
    return [str(s.root) for s in recipe.data.sources] + [str(v.folder) for v in recipe.data.val or []]


def data_files(recipe: Recipe) -> str:
    """The training data wherever it lives: each category's train/good and data.val file names and sizes."""
    from uadc.data.sources import resolve_sources
    folders = [(cat, Path(root) / cat / "train" / "good")
               for root, cat in resolve_sources([s.model_dump() for s in recipe.data.sources])]
    folders += [(f"val:{v.category}", Path(v.folder)) for v in recipe.data.val or []]
    items = [(tag, f.name, f.stat().st_size) for tag, d in folders if d.is_dir()
             for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _check_moved_data(blob: dict, trained: Recipe, recipe: Recipe, path: Path) -> None:
    """Data folders other than at training: the same files (by name and size) are the same data."""
    if _data_folders(trained) == _data_folders(recipe):
        return
    stored = blob.get("data_files")
    if stored is not None and stored == data_files(recipe):
        log.info("checkpoint %s: its training data is now at another path (files of the same names and sizes)", path)
        return
    where = _first_difference(trained.cfg["data"], recipe.cfg["data"], "data")
    raise UadcError(f"checkpoint {path} was trained on data elsewhere ({where}), and "
                    f"{'its training files differ' if stored else 'it predates the record of its training files'}: "
                    f"point data.sources at the data it trained on, or retrain with `uadc train`")


def checkpoint_path(recipe: Recipe, artifacts: Path | None = None, category: str | None = None) -> Path:
    d = recipe.artifact_dir(artifacts)
    return (contained(d / ONE_CLASS_DIR, category, "category") if category else d) / CHECKPOINT_FILE


def checkpoint_arg(path: Path | None) -> Path | None:
    """``--checkpoint``: a recipe file there fell back to the recipe's own checkpoint, silently."""
    if path is not None and Path(path).suffix in (".yaml", ".yml"):
        raise UadcError(f"--checkpoint {path}: a recipe file, not a checkpoint (checkpoint.pt)")
    return path


def missing_checkpoint(recipe: Recipe, artifacts: Path | None, given: Any) -> UadcError:
    """The error for a recipe without its unified checkpoint; one-class checkpoints beside it do not
    stand in for it, so the advice names what compiles them."""
    if artifacts is not None and Path(artifacts).exists() and not Path(artifacts).is_dir():
        return UadcError(f"artifacts: not a folder: {artifacts}")
    path = checkpoint_path(recipe, artifacts)
    one_class = sorted(p.parent.name for p in (path.parent / ONE_CLASS_DIR).glob(f"*/{CHECKPOINT_FILE}"))
    extra = (f"; {path.parent / ONE_CLASS_DIR} holds one-class models of {', '.join(one_class)}, which do not compile "
             f"from this recipe: to deploy one model per category, train a recipe whose data.sources list only one "
             f"category, or run a sweep with `axes: {{one_class: [true]}}`" if one_class else "")
    where = f" --artifacts {artifacts}" if artifacts is not None else ""   # else it trained into ./artifacts
    return UadcError(f"no checkpoint for recipe {recipe.name!r} at {path}: run `uadc train {given}{where}` first "
                     f"(or pass --train-if-missing){extra}")


def make_model(recipe: Recipe) -> KDModel:
    return build_model(recipe.cfg["model"], recipe.data.image_size)


def save_checkpoint(path: Path, model: KDModel, recipe: Recipe, history: list[dict], categories: list[str],
                    extra: dict | None = None) -> Path:
    blob = {"state_dict": model.state_dict(), "recipe": recipe.cfg, "recipe_hash": recipe.hash,
            "model_hash": model_hash(recipe), "data_files": data_files(recipe), "history": history,
            "categories": categories,
            "uadc_version": __version__, **(extra or {})}
    one_class = categories[0] if (extra or {}).get("one_class") else None
    with signals_deferred():   # both or neither: a stop in between left the earlier model's recipe beside the new one
        atomic_save(path, lambda tmp: torch.save(blob, tmp))
        atomic_write_text(path.parent / RECIPE_COPY, _recipe_text(recipe, one_class))
    return path


def _recipe_text(recipe: Recipe, one_class: str | None = None) -> str:
    """The copy; a one-class model's says that the file, compiled, is the recipe's unified model
    (it was compiled silently as if it were this one)."""
    head = (f"# The recipe whose one-class model of {one_class!r} is {CHECKPOINT_FILE} here (`uadc train --one-class`).\n"
            f"# For reading: given to uadc, this file means the recipe's unified model, not this one.\n"
            if one_class else "")
    return head + dump_yaml(recipe.cfg)


def check_recipe_copy(path: Path, recipe: Recipe, one_class: str | None = None) -> None:
    """Before training: the recipe copy written beside checkpoint ``path`` must not replace the
    recipe file being trained (an artifacts folder that holds the user's own recipe), unless it
    is already that copy, word for word."""
    copy = path.parent / RECIPE_COPY
    try:
        same = recipe.path is not None and copy.is_file() and copy.samefile(recipe.path)
        if same and copy.read_text(encoding="utf-8") != _recipe_text(recipe, one_class):
            raise UadcError(f"training would overwrite the recipe file itself with uadc's copy of it: {copy} "
                            f"(keep recipes outside the artifacts folder, or pass another --artifacts)")
    except (OSError, UnicodeDecodeError):
        return   # unreadable: the write reports it


class CheckpointBlob(dict):
    """A checkpoint's dict, with ``sha256``: the digest of the very bytes it was read from (hashing the
    file again later named the checkpoint trained since, not the model read)."""
    sha256: str = ""


def read_checkpoint(path: Path) -> CheckpointBlob:
    """The checkpoint's dict, loaded without running any code it may carry."""
    path = Path(path)
    if path.is_dir():
        raise UadcError(f"checkpoint {path} is a folder; give its checkpoint file (checkpoint.pt)")
    if not path.is_file():
        hint = "uadc train --one-class" if ONE_CLASS_DIR in path.parts else "uadc train"   # per-category models
        raise UadcError(f"checkpoint not found: {path} (run `{hint}` first)")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise UadcError(f"checkpoint {path} is larger than {MAX_CHECKPOINT_BYTES >> 30} GiB")
    try:   # an I/O error, or a file open() cannot read (permissions, /proc/self/mem): one line
        f = open(path, "rb")
        head, digest = f.read(4), sha256_stream(f)   # one open file: a retrain replacing it meanwhile is not read
    except OSError as exc:
        raise UadcError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    with f:
        if head and head[:1] != b"\x80" and head != b"PK\x03\x04":   # neither torch's zip nor a pickle: a recipe?
            raise UadcError(f"cannot read checkpoint {path}: not a torch checkpoint file (it starts with {head!r})")
        if head == b"PK\x03\x04":
            _check_zip_crc(f, path)
        try:
            f.seek(0)
            with warnings_ignored():  # torch's pickle-protocol notes are not for the user
                blob = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UadcError(f"checkpoint {path} {pickle_refusal(exc)}") from None
        except Exception as exc:  # truncated zip, not a torch file, ...
            raise UadcError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict) or \
            not isinstance(blob.get("recipe"), dict):
        raise UadcError(f"checkpoint {path} is not a uadc checkpoint (no state_dict/recipe)")
    _check_metadata(blob, path)
    blob = CheckpointBlob(blob)
    blob.sha256 = digest
    return blob


def _check_zip_crc(f: Any, path: Path) -> None:
    """torch's zip records a CRC for every member but torch.load does not check them: 64 bytes flipped
    in the weights loaded, and eval and compile went on with a damaged model (exit 0)."""
    import zipfile
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:   # a truncated or mangled archive
        raise UadcError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if bad is not None:
        raise UadcError(f"checkpoint {path} is damaged: {bad} does not match its checksum (copy or train it again)")


def _plain_data(v: Any) -> bool:
    """What eval.json can carry on: numbers, text, None, and lists / str-keyed dicts of them."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_data(x) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return all(_plain_data(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool))


def _check_metadata(blob: dict, path: Path) -> None:
    """The fields ``uadc eval`` reads besides the weights (the training history, stats, seconds)."""
    history = blob.get("history", [])
    ok = isinstance(history, list) and all(
        isinstance(h, dict) and isinstance(h.get("epoch"), int) and isinstance(h.get("seconds", 0), (int, float))
        and isinstance(h.get("setup_seconds", 0), (int, float))
        and ("test" not in h or isinstance(h["test"], dict) and {"mean", "categories"} <= set(h["test"]))
        for h in history)
    # the learning curve sums every epoch's seconds
    ok = ok and (not any("test" in h for h in history) or all("seconds" in h for h in history))
    for key, fine in (("history", ok), ("stats", _plain_data(blob.get("stats"))),
                      ("train_seconds", blob.get("train_seconds") is None or isinstance(blob["train_seconds"], (int, float))),
                      ("categories", _plain_data(blob.get("categories")))):
        if not fine:
            raise UadcError(f"checkpoint {path}: its {key} is not what uadc train writes (edited or damaged); "
                            f"retrain with `uadc train`")


_MODEL_SECTIONS = ("name", "seed", "data", "model", "train")
_ONE_CLASS_HINT = " (a one-class checkpoint is judged by `uadc eval --one-class` of the recipe that trained it)"


def trained_recipe(blob: dict, path: Path) -> Recipe:
    """The recipe a checkpoint was trained with (its stored sections, defaults filled in)."""
    try:   # only what the model depends on: a stored compile / deploy section a newer uadc refuses is no matter
        return recipe_from_dict({k: v for k, v in blob["recipe"].items() if k in _MODEL_SECTIONS}, keep_name=True)
    except UadcError as exc:
        raise UadcError(f"checkpoint {path}: its stored recipe is invalid ({exc})") from None


def other_training(path: Path, recipe: Recipe) -> str | None:
    """The first training setting (threads aside) in which the checkpoint differs from ``recipe``, or None."""
    trained = {k: v for k, v in trained_recipe(read_checkpoint(path), path).cfg["train"].items() if k != "threads"}
    asked = {k: v for k, v in recipe.cfg["train"].items() if k != "threads"}
    return None if trained == asked else _first_difference(trained, asked, "train")


def load_checkpoint(path: Path, recipe: Recipe | None = None, retrain: str = "uadc train") -> tuple[KDModel, dict]:
    """The model (eval mode) and the checkpoint dict; refuses a checkpoint of other settings, naming
    ``retrain`` (``uadc eval --one-class`` names ``uadc train --one-class``: `uadc train` left it refusing)."""
    blob = read_checkpoint(path)
    trained = trained_recipe(blob, path)
    if recipe is not None:  # the scoring head holds no weights: the recipe asking now picks it
        _warn_knn_scale(trained, recipe, path)
        trained = trained.with_overrides(model={k: recipe.cfg["model"][k] for k in HEAD_KEYS})
    # Recompute from the stored recipe rather than trusting a stored hash of an older definition.
    if recipe is not None and model_hash(trained) != model_hash(recipe):
        where = _model_difference(trained, recipe)
        raise UadcError(f"checkpoint {path} was trained with different data/model settings than "
                        f"recipe {recipe.path or recipe.name} ({where}); retrain with `{retrain}`"
                        f"{_ONE_CLASS_HINT if blob.get('one_class') and '--one-class' not in retrain else ''}")
    if recipe is not None:
        _check_moved_data(blob, trained, recipe, path)
    if recipe is not None and trained.seed != recipe.seed and recipe.data.val_fraction > 0:
        raise UadcError(f"checkpoint {path} was trained with seed {trained.seed}, recipe {recipe.path or recipe.name} "
                        f"has seed {recipe.seed}: the seed draws the validation normals held out of training, so this "
                        f"recipe's would include images the checkpoint trained on (its thresholds set on them); use "
                        f"seed {trained.seed} or retrain with `uadc train`")
    if recipe is not None and trained.cfg["train"] != recipe.cfg["train"]:   # same model, other training: say so
        # a warning: at INFO, -q hid it, and an edited recipe compiled its old model as if trained with it
        log.warning("checkpoint %s was trained with other training settings than recipe %s (%s)", path,
                 recipe.path or recipe.name, _first_difference(trained.cfg["train"], recipe.cfg["train"], "train"))
    check_finite_weights(blob["state_dict"], path)
    model = _weightless(trained)
    own = model.state_dict()   # load_state_dict casts: int64 weights were truncated to whole numbers, silently
    odd = next(((k, v.dtype) for k, v in blob["state_dict"].items() if k in own and isinstance(v, torch.Tensor)
                and v.dtype != own[k].dtype), None)
    if odd:
        raise UadcError(f"checkpoint {path}: weight {odd[0]} is {odd[1]}, the model's is {own[odd[0]].dtype}")
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UadcError(f"checkpoint {path}: weights do not fit the model ({str(exc).splitlines()[0][:200]})") \
            from None
    model.eval()
    return model, blob


def _weightless(recipe: Recipe) -> KDModel:
    """The recipe's model with every weight still to load (from a checkpoint or a model): the initial weights'
    file is not read (moved with a project, its stored path is gone). Its (CPU) initialisation leaves the
    caller's stream, and waits for a training in another thread (a bare fork_rng rewound that training's seeded
    stream mid-run); a caller's float64 default made a float64 model."""
    with streams_kept(), float32_default():
        return build_model({**recipe.cfg["model"], "pretrained": False, "weights": None}, recipe.data.image_size)


def as_recipe_model(model: KDModel, recipe: Recipe) -> KDModel:
    """``model``'s weights in the model the recipe builds (eval mode), as a checkpoint is loaded: its scoring
    head's weight-free settings are the recipe's. Refuses a ``KDModel`` the recipe's model settings do not
    build (another method, backbone, taps, kNN term, combine, smoothing or image size): it was compiled and
    judged as that recipe's, its artifact naming a recipe that cannot make it."""
    want = _weightless(recipe)
    have, need = model.state_dict(), want.state_dict()
    odd = [f"a {type(model).__name__}, the recipe builds a {type(want).__name__}"] if type(model) is not type(want) \
        else [f"weight {k} {'only in the model' if k in have else 'missing'}" for k in sorted(set(have) ^ set(need))]
    odd += [f"weight {k} is {tuple(have[k].shape)}, the recipe's {tuple(need[k].shape)}" for k in need
            if not odd and "knn." not in k and have[k].shape != need[k].shape]   # a kNN bank's size is the data's
    if not odd:   # settings held as plain attributes (head.combine, head.blur.sigma, head.image_size)
        mine, theirs = _settings_of(model), _settings_of(want)
        odd = [f"{k} is {mine[k]!r}, the recipe's {theirs[k]!r}" for k in sorted(set(mine) & set(theirs))
               if mine[k] != theirs[k]]
    if odd:
        raise UadcError(f"the KDModel is not what recipe {recipe.name}'s model settings build ({odd[0]}): give the "
                        f"recipe it was trained with")
    want.load_state_dict(have)   # copies: the caller's model (mid-fine-tune, in train mode) is left as it was
    return want.eval()


def _settings_of(model: KDModel) -> dict[str, Any]:
    """``module.attribute`` -> value of every plain setting a model's modules hold, but the head's weight-free
    ones (the recipe picks those) and the head's kind's own (exact and fast hold others)."""
    plain = (int, float, str, bool, tuple, type(None))
    return {f"{name}.{k}".lstrip("."): v for name, mod in model.named_modules() for k, v in vars(mod).items()
            if not k.startswith("_") and k != "training" and k not in HEAD_KEYS and isinstance(v, plain)}


def held_out(recipe: Recipe, data: Any, categories: list[str]) -> list[str]:
    """``category/file`` of the validation normals split from train/good (not data.val folders): the
    images the checkpoint did not train on."""
    own = [v.category for v in recipe.data.val or []]   # typed in either Unicode form, as prepare_data reads them
    return sorted(f"{c}/{s.path.name}" for c in categories if not any(same_name(c, o) for o in own) and c in data.val
                  for s in data.val[c].samples)


def check_held_out(blob: dict, recipe: Recipe, data: Any, path: Path | None) -> None:
    """Thresholds are set on validation normals the model never trained on; the split is drawn from
    the files in train/good now, so after files were added or removed it held images it trained on."""
    stored = blob.get("held_out")
    if stored is None:   # a checkpoint from before this record
        return
    now = set(held_out(recipe, data, [c for c in blob.get("categories") or [] if c in data.val]))
    new = sorted(now - set(stored))
    if new:
        raise UadcError(f"checkpoint {path}: the train/good files changed since training, and the validation normals "
                        f"drawn now include {len(new)} it was not holding out (e.g. {new[0]}): thresholds would be set "
                        f"on images it trained on; retrain, or restore the files")


def judged_categories(blob: dict, categories: list[str], path: Path | None, subset: bool = True) -> list[str]:
    """The recipe's categories a checkpoint is judged on: a one-class model's own (with ``subset``;
    else they must be the recipe's). Judged on all, it gave figures, or compiled thresholds, for
    products it never saw (or failed at the manifest after all the work)."""
    trained = list(blob.get("categories") or [])
    if trained and not blob.get("one_class") and sorted(trained) != sorted(categories):   # folders found anew
        change = [f"{what}: {', '.join(cats)}" for what, cats in (("new", sorted(set(categories) - set(trained))),
                                                                 ("gone", sorted(set(trained) - set(categories)))) if cats]
        raise UadcError(f"checkpoint {path} was trained on {', '.join(sorted(trained))}; the recipe's data now holds "
                        f"{', '.join(sorted(categories))} ({'; '.join(change)}): train again, or list "
                        f"data.sources[].categories")
    own = trained if blob.get("one_class") else list(categories)
    if sorted(own) != sorted(categories) and not (subset and set(own) <= set(categories)):
        raise UadcError(f"checkpoint {path} is the one-class model of {own}, the recipe covers {sorted(categories)}: "
                        f"judge it with `uadc eval --one-class`; to deploy one model per category, train a recipe whose "
                        f"data.sources list only {', '.join(own)} (`uadc train`), or run a sweep with `axes: "
                        f"{{one_class: [true]}}`, which trains and compiles one per category")
    return own


def _warn_knn_scale(trained: Recipe, recipe: Recipe, path: Path) -> None:
    """The kNN terms were scaled to the score / map of the head the checkpoint trained with: under
    another head setting their weight is not the recipe's (a silent ~7 % on the reviewer's case)."""
    changed = [k for k in HEAD_KEYS if trained.cfg["model"][k] != recipe.cfg["model"][k]]
    knn = [n for n in ("image_knn", "patch_knn") if trained.cfg["model"][n]["weight"] > 0]
    if changed and knn:
        log.warning("checkpoint %s: its %s scale was measured with the trained %s; under this recipe's the term's "
                    "weight differs from model.%s.weight (retrain to rescale it)", path, " and ".join(knn),
                    ", ".join(f"{k}: {trained.cfg['model'][k]}" for k in changed), knn[0])


def note_replaced_checkpoint(path: Path, recipe: Recipe) -> None:
    """A warning before training replaces a checkpoint of other data/model settings: two recipe files of
    one ``name`` share ``<artifacts>/<name>``, and training one replaced the other's model without a word."""
    if not path.is_file():
        return
    try:
        stored = read_checkpoint(path)["recipe"]
        trained = recipe_from_dict({k: v for k, v in stored.items() if k in _MODEL_SECTIONS}, keep_name=True)
    except (UadcError, KeyError, TypeError):   # unreadable or foreign: nothing to say of its settings
        return
    if model_hash(trained) != model_hash(recipe):
        where = _model_difference(trained, recipe)
        log.warning("%s: replacing a checkpoint trained with other data/model settings (%s); recipes that share the "
                    "name %r share this folder", path, where, recipe.name)


def _model_difference(trained: Recipe, asked: Recipe) -> str:
    """The first data/model setting that differs; a folder (not compared) shown as `<folder>`, not `None`."""
    return _first_difference(_hashed(trained, folder="<folder>"), _hashed(asked, folder="<folder>"))


def _first_difference(trained: Any, asked: Any, key: str = "") -> str:
    """``key: <checkpoint's> in the checkpoint, <recipe's> in the recipe`` for the first setting that differs."""
    if isinstance(trained, dict) and isinstance(asked, dict):   # the method first, not an option that follows from it
        order = {k: i for i, k in enumerate(("method", "backbone", "taps"))}
        for k in sorted(set(trained) | set(asked), key=lambda k: (order.get(k, len(order)), k)):
            if trained.get(k) != asked.get(k):
                return _first_difference(trained.get(k), asked.get(k), f"{key}.{k}" if key else k)
    if isinstance(trained, list) and isinstance(asked, list) and len(trained) == len(asked):
        i = next(i for i, (a, b) in enumerate(zip(trained, asked)) if a != b)
        return _first_difference(trained[i], asked[i], f"{key}[{i}]")
    return f"{key}: {trained!r:.120} in the checkpoint, {asked!r:.120} in the recipe"


def check_finite_weights(state_dict: dict, path: Path) -> None:
    """A checkpoint with NaN/Inf weights is refused before any export or artifact: the error
    names the tensors, which is the cause (an export would only show NaN outputs downstream)."""
    odd = next(((k, v) for k, v in state_dict.items() if isinstance(v, torch.Tensor) and
                (v.layout != torch.strided or v.device.type != "cpu")), None)
    if odd:   # a sparse or meta tensor: NotImplementedError / RuntimeError tracebacks in the checks below
        raise UadcError(f"checkpoint {path}: weight {odd[0]} is a {str(odd[1].layout).removeprefix('torch.')} tensor "
                        f"on {odd[1].device}, not a dense one in memory as uadc writes them; retrain with `uadc train`")
    bad = [f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UadcError(f"checkpoint {path}: NaN/Inf in the weights: {', '.join(bad[:3])}{more}; "
                        f"retrain (e.g. with a lower train.lr)")
