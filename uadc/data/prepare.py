"""A recipe's data, validated once: the unified training set, the held-out validation normals
(the only images operating thresholds are set on) and the per-category test sets."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from uadc.config.recipe import Recipe
from uadc.core.errors import UadcError
from uadc.core.io import file_key
from uadc.core.names import same_name
from uadc.data.mvtec import (ImageDataset, Sample, build_test_sets, build_train_set, list_folder_samples,
                             list_train_samples, split_validation, untested, validate_test_masks)
from uadc.data.sources import resolve_sources

log = logging.getLogger(__name__)
MIN_VAL_IMAGES = 20   # below this a 1 % false-alarm quantile is mostly the margin (README)


@dataclass
class RecipeData:
    pairs: list[tuple[Path, str]]           # (root, category)
    train: ImageDataset                      # good training images of every category (validation excluded)
    tests: dict[str, ImageDataset]           # category -> test set with masks (categories with a test folder)
    val: dict[str, ImageDataset] = field(default_factory=dict)  # category -> validation normals
    warnings: list[str] = field(default_factory=list)
    not_evaluated: dict[str, str] = field(default_factory=dict)   # category -> why it has no figures

    @property
    def categories(self) -> list[str]:
        return [c for _, c in self.pairs]


def validation_samples(recipe: Recipe, pairs: list[tuple[Path, str]],
                       listed: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    """category -> validation normals: ``data.val`` folders where given, else a seeded
    ``data.val_fraction`` share of the category's train/good images (``listed``)."""
    explicit: dict[str, list[Sample]] = {}
    seen: dict[Path, int] = {}
    for i, v in enumerate(recipe.data.val or []):
        real = Path(v.folder).resolve()
        if real in seen:   # its normals counted twice: thresholds on a doubled sample, the small-sample warning off
            raise UadcError(f"data.val[{i}]: folder {v.folder} is data.val[{seen[real]}]'s too")
        seen[real] = i
        cat = _own_name(v.category, pairs)
        if cat is not None:
            explicit.setdefault(cat, []).extend(list_folder_samples(Path(v.folder), cat))
    out = {}
    for root, cat in pairs:   # a file in two data.val folders (a `cp -al` copy listed too) counts once
        given = list({file_key(s.path): s for s in explicit.get(cat, [])}.values())
        out[cat] = given or split_validation(listed[cat], recipe.data.val_fraction, recipe.seed)
    return out


def _own_name(category: str, pairs: list[tuple[Path, str]]) -> str | None:
    """The category a data.val entry names, typed in either Unicode form (a folder copied from macOS is
    NFD): 'café' typed was "not in data.sources" beside the folder café."""
    return next((c for _, c in pairs if same_name(c, category)), None)


def _one_class(tests: dict[str, ImageDataset]) -> dict[str, str]:
    """category -> "good" or "defective" for test sets that hold one kind only (AUROC undefined)."""
    out = {}
    for c, ds in tests.items():
        kinds = {s.defect == "good" for s in ds.samples}
        if len(kinds) == 1:
            out[c] = "good" if kinds.pop() else "defective"
    return out


def _val_in_tests(val: dict[str, list[Sample]], is_test: Callable[[Path], str | None], given: set[str]) -> list[str]:
    """Validation normals that are also test images: the thresholds are then set on the very images
    whose decisions are reported (false-reject rates look better than the line will see). ``given``:
    the categories whose normals come from data.val (the others' from data.val_fraction)."""
    def _val_source(c: str) -> str:   # it said "(data.val)" of normals drawn from a test/good linked to train/good
        return "data.val" if c in given else "drawn from train/good by data.val_fraction"

    both = Counter((c, t) for c, ss in val.items() for s in ss if (t := is_test(s.path)) is not None)
    return [f"category {c!r}: {n} of its {len(val[c])} validation normals ({_val_source(c)}) are " + (
            "test images: thresholds are set on images the test decisions are reported on; keep them apart" if c == t
            else f"test images of category {t!r} too (the same files): keep each product's normals and test images "
            f"apart")
            for (c, t), n in both.items()]


def _train_in_tests(train: list[Sample], is_test: Callable[[Path], str | None]) -> list[str]:
    """Training images that are also test images (a test/good linked to train/good): AUROC on images
    the model trained on, with no warning. A copy in another category's test set is named there (a
    shared blank frame was blamed on the category that trained on it, also one-class)."""
    both = Counter((s.category, t) for s in train if (t := is_test(s.path)) is not None)
    return [f"category {c!r}: {n} of its training images are test images too: its figures judge images the model "
            f"trained on; keep train/ and test/ apart" if c == t else
            f"category {t!r}: {n} of its test images are training images of category {c!r}: a unified model's figures "
            f"for {t!r} judge images it trained on" for (c, t), n in both.items()]


def _val_in_train(train: list[Sample], val: dict[str, list[Sample]], given: set[str]) -> list[str]:
    """data.val normals that are copies of training images (a link is left out of training already):
    thresholds set on images the model trained on sit low, and the line sees more false alarms."""
    is_val = _copy_matcher([(s.path, c) for c, ss in val.items() if c in given for s in ss])
    both = Counter(s.category for s in train if is_val(s.path) == s.category)
    return [f"category {c!r}: {n} of its validation normals (data.val) are copies of its training images: thresholds "
            f"are set on images the model trained on (too low: more false alarms); keep data.val apart from "
            f"train/good" for c, n in both.items()]


def _test_image_matcher(tests: dict[str, ImageDataset]) -> Callable[[Path], str | None]:
    """The test category a file is a test image of: the same file (a link) or a byte-identical copy
    (`cp -r train/good test/good` was trained on without a word); None if none."""
    return _copy_matcher([(s.path, c) for c, ds in tests.items() for s in ds.samples])


def _copy_matcher(paths: list[tuple[Path, str]]) -> Callable[[Path], str | None]:
    """The category of the listed file a file is (a link) or copies byte for byte; None if none. Only
    same-sized files are read."""
    keys = {file_key(p): c for p, c in paths}
    by_size: dict[int | None, list[tuple[Path, str]]] = {}
    for p, c in paths:
        by_size.setdefault(_size(p), []).append((p, c))
    by_size.pop(None, None)
    digests: dict[int, dict[str | None, str]] = {}

    def is_test(path: Path) -> str | None:
        if (c := keys.get(file_key(path))) is not None:
            return c
        size = _size(path)
        if size not in by_size:
            return None
        if size not in digests:
            digests[size] = {_digest(q): c for q, c in by_size[size]}
            digests[size].pop(None, None)
        return digests[size].get(_digest(path))
    return is_test


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:   # gone since it was listed: its reader names it
        return None


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _sources(recipe: Recipe) -> list[tuple[Path, str]]:
    try:
        return resolve_sources([s.model_dump() for s in recipe.data.sources], warn=True)
    except UadcError as exc:   # a built-in recipe cannot be edited where it is installed: say how to copy it
        from uadc.config.packaged import recipes_dir
        if recipe.path is None or Path(recipe.path).resolve().parent != recipes_dir().resolve():
            raise
        raise UadcError(f"{exc}; built-in recipe {recipe.name!r}: `uadc recipes show {recipe.name} > my.yaml`, set "
                        f"the key there and run my.yaml") from None


def prepare_data(recipe: Recipe, categories: list[str] | None = None) -> RecipeData:
    """Validates all data (train and test, masks included) before any training starts."""
    pairs = _sources(recipe)
    unknown = sorted(v.category for v in recipe.data.val or [] if _own_name(v.category, pairs) is None)
    if unknown:
        raise UadcError(f"data.val: category {unknown[0]!r} is not in data.sources")
    if categories:
        pairs = [p for p in pairs if p[1] in categories]
    norm = recipe.normalization()
    size = recipe.data.image_size
    listed = {cat: list_train_samples(root, cat) for root, cat in pairs}   # listed once: its warnings once
    val_samples = validation_samples(recipe, pairs, listed)
    held_out = frozenset(s.path for ss in val_samples.values() for s in ss)
    train = build_train_set(pairs, size, norm, recipe.data.train_limit, exclude=held_out, listed=listed)
    tests = build_test_sets(pairs, size, norm)
    for ds in tests.values():
        validate_test_masks(ds)
    one_class = _one_class(tests)
    tests = {c: ds for c, ds in tests.items() if c not in one_class}
    val = {c: ImageDataset(ss, size, *norm) for c, ss in val_samples.items()}
    rest = ("rest mostly on the small-sample margin" if recipe.deploy.threshold_margin else   # the demo: no margin
            "are the quantile of a few images (deploy.threshold_margin: false), a rough estimate")
    warnings = [f"category {c!r} has {len(ds)} validation normals (< {MIN_VAL_IMAGES}): its thresholds {rest}; "
                f"raise data.val_fraction or give data.val" for c, ds in val.items() if 0 < len(ds) < MIN_VAL_IMAGES]
    warnings += [f"category {c!r} has no validation normals: it is judged at the global thresholds; give data.val "
                 f"or more train/good images" for c, ds in val.items() if not len(ds) and any(len(v) for v in val.values())]
    warnings += [f"category {c!r}: its test folder holds {kind} images only, and AUROC needs good and defective "
                 f"ones: not evaluated" for c, kind in one_class.items()]
    is_test = _test_image_matcher(tests)   # each test image's digest read once, for both checks
    given = {_own_name(v.category, pairs) for v in recipe.data.val or []}
    warnings += _val_in_tests(val_samples, is_test, given)
    warnings += _train_in_tests(train.samples, is_test)
    warnings += _val_in_train(train.samples, val_samples, given)
    for w in warnings:
        log.warning(w)
    why = {c: untested(root, c) or "no test images" for root, c in pairs if c not in tests and c not in one_class}
    given = "trained and given operating thresholds" if any(len(v) for v in val.values()) else "trained"
    for reason in sorted(set(why.values())):   # thresholds only where some category has validation normals
        log.info("%s: %s, not evaluated (%s)", ", ".join(c for c in why if why[c] == reason), given, reason)
    not_evaluated = {c: f"its test folder holds {kind} images only" for c, kind in one_class.items()}
    not_evaluated.update(why)
    return RecipeData(pairs, train, tests, val, warnings, not_evaluated)
