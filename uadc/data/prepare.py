"""A recipe's data, validated once: the unified training set and per-category test sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from uadc.config.recipe import Recipe
from uadc.data.mvtec import ImageDataset, build_test_sets, build_train_set, resolve_sources, validate_test_masks


@dataclass
class RecipeData:
    pairs: list[tuple[Path, str]]           # (root, category)
    train: ImageDataset                      # good training images of every category
    tests: dict[str, ImageDataset]           # category -> test set with masks

    @property
    def categories(self) -> list[str]:
        return [c for _, c in self.pairs]


def prepare_data(recipe: Recipe, categories: list[str] | None = None) -> RecipeData:
    """Validates all data (train and test, masks included) before any training starts."""
    pairs = resolve_sources([s.model_dump() for s in recipe.data.sources])
    if categories:
        pairs = [p for p in pairs if p[1] in categories]
    norm = recipe.normalization()
    size = recipe.data.image_size
    train = build_train_set(pairs, size, norm, recipe.data.train_limit)
    tests = build_test_sets(pairs, size, norm)
    for ds in tests.values():
        validate_test_masks(ds)
    return RecipeData(pairs, train, tests)
