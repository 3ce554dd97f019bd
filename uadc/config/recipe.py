"""Recipe files: a YAML document describing data, model, training, evaluation and compilation.

The typed models below are the single source of truth: every key, its type, default, bounds and meaning
(``uadc recipe-schema`` prints them, ``--json`` as a JSON Schema for editors). Loading validates the whole
document and reports the first problem with its key path (``model.backbone: 'resnet19' is not one of ...``).
Relative paths resolve against the recipe. Numbers are finite and bounded, names plain folder names: no
recipe makes uadc allocate without bound or write outside its artifacts root."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from uadc.config.locations import without_locations
from uadc.config.packaged import check_not_a_sweep_file, check_recipe_file, resolve_recipe_path
from uadc.config.targets import TARGETS
from uadc.config.validation import first_error, listed_twice, merged
from uadc.config.yaml_file import read_yaml_mapping
from uadc.core.constants import CALIBRATION_KINDS, DEFAULT_TAPS, MAX_THREADS, PARTITIONS
from uadc.core.errors import UadcError
from uadc.core.images import shown
from uadc.core.names import is_output_name, is_plain_name

METHODS = ("stfpm", "paste", "rd", "us")
BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2", "mobilenet_v2")
CALIB_DATA = CALIBRATION_KINDS
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
UNIT_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# (mean, std) in [0, 1] pixel units that each backbone's pretrained weights expect.
BACKBONE_NORMALIZATION = {"efficientnet_lite0": UNIT_NORM, "resnet18": IMAGENET_NORM,
                          "wide_resnet50_2": IMAGENET_NORM, "mobilenet_v2": IMAGENET_NORM}
# model keys that only some methods read
METHOD_KEYS = {"split": ("paste",), "students": ("us",), "descriptor_dim": ("us",), "student_width": ("rd", "us"),
               "head": ("stfpm", "paste", "rd"), "combine": ("stfpm", "paste", "rd")}   # US: its own head
MAX_RECIPE_BYTES = 1 << 20
MAX_SEED = 2**32 - 1  # numpy's seed range


_PLACES = {"Source": "data.sources[]", "ValSource": "data.val[]", "DataConfig": "data", "ImageKnnConfig":
           "model.image_knn", "PatchKnnConfig": "model.patch_knn", "ModelConfig": "model", "DcamConfig":
           "train.dcam", "TrainConfig": "train", "EvalConfig": "eval", "AutoPrecisionConfig": "compile.auto",
           "CompileConfig": "compile", "QatConfig": "qat", "DeployConfig": "deploy", "VerifyConfig": "verify"}


class _Section(BaseModel):
    # validate_assignment: `recipe.train.epochs = -1` is refused where it is written (it trained an empty checkpoint)
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False,
                              validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:   # the API's one kind of error, as for a recipe file
            place = _PLACES.get(type(self).__name__, "")   # where it sits: `train.epochs`, not `epochs`
            said = first_error(exc, root=place or "recipe", model=type(self))
            placed = not place or said.startswith((f"{place}.", f"{place}:"))   # `train_epochs` is no `train.`
            raise UadcError(said if placed else f"{place}.{said}") from None


def _resolve(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    if value is not None and not value.strip():   # "" resolved to the recipe's own folder
        raise ValueError("an empty path")
    long = next((part for part in Path(value or "").parts if len(os.fsencode(part)) > 255), None)
    if long is not None:   # the filesystem's limit: an OSError traceback later
        raise ValueError(f"a part of the path is {len(os.fsencode(long))} bytes long ({long[:24]}...); a file "
                         f"system allows 255")
    base = (info.context or {}).get("base")
    return value if value is None or base is None or Path(value).is_absolute() else str((Path(base) / value).resolve())


class Source(_Section):
    root: str = Field(description="dataset root in MVTec layout (<root>/<category>/...)")
    categories: Optional[list[str]] = Field(None, min_length=1, description="categories under root; all if omitted")

    _root = field_validator("root")(_resolve)

    @field_validator("categories")
    @classmethod
    def _plain_categories(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        # a folder under root and under the artifacts (one-class models); length first (0.4 MB of aliases: 57 s)
        bad = [c for c in v or [] if len(c) > 255 or not is_plain_name(c) or len(os.fsencode(c)) > 255]
        if bad:
            raise ValueError(f"{bad[0][:60]!r} is not a plain folder name under root (no '/', '..', leading '.' or "
                             f"control character, at most 255 bytes)")
        return v


class ValSource(_Section):
    category: str = Field(description="category the folder's normal images belong to")
    folder: str = Field(description="folder of defect-free images of that category")

    _folder = field_validator("folder")(_resolve)


class DataConfig(_Section):
    sources: list[Source] = Field(min_length=1, description="list of {root, categories}")
    image_size: int = Field(256, ge=32, le=1024, description="square input size in pixels; a multiple of the deepest "
                            "features' stride (16 or 32; RD's embedding twice its deepest tap's) keeps them aligned "
                            "(training warns otherwise)")
    normalization: Literal["backbone", "imagenet", "unit"] = Field(
        "backbone", description="input normalisation: the backbone's own, ImageNet mean/std, or [-1, 1]")
    train_limit: Optional[int] = Field(None, ge=1, le=10**6, description="use at most N train images per category")
    val_fraction: float = Field(0.1, ge=0, le=0.5, description="share of each category's train/good held out "
                                "(by seed) as validation normals for thresholds; never trained on")
    val: Optional[list[ValSource]] = Field(None, min_length=1, description="explicit validation normals: "
                                           "{category, folder}; such a category keeps all its train images")


class ImageKnnConfig(_Section):
    """Image score += weight x distance of the image's pooled teacher features to the nearest training
    normals, both standardised on the validation normals: evidence of image-wide changes (uneven
    brightness, wrong part) that a local map reduced by its top pixels ranks poorly."""
    weight: float = Field(0.0, ge=0, le=100, description="weight of the standardised kNN distance (0: off)")
    taps: Optional[list[str]] = Field(None, min_length=1, description="teacher taps pooled (default: all model.taps)")
    k: int = Field(1, ge=1, le=64, description="nearest training normals averaged")
    max_bank: int = Field(4096, ge=1, le=100_000, description="at most this many training images in the bank "
                          "(a seeded subset beyond)")


class PatchKnnConfig(_Section):
    """Map += weight x distance of each location's teacher features to the nearest training patch (a PatchCore-style
    memory bank: a greedy coreset of the training patches), in units of the map's spread on the validation normals:
    local evidence the student's discrepancy misses (large, low-contrast defects like magnetic_tile's uneven)."""
    weight: float = Field(0.0, ge=0, le=100, description="weight of the scaled patch distance (0: off)")
    taps: Optional[list[str]] = Field(None, min_length=1, description="teacher taps described per location (subset "
                                      "of model.taps; default: all), each 3x3 averaged, at the finest one's size")
    bank: int = Field(2048, ge=1, le=65_536, description="patches kept (greedy coreset of the training patches)")


class ModelConfig(_Section):
    method: Literal["stfpm", "paste", "rd", "us"] = Field("stfpm", description="the knowledge-distillation method: "
        "STFPM, PaSTe (partial student), Reverse Distillation or Uninformed Students")
    backbone: Literal["efficientnet_lite0", "resnet18", "wide_resnet50_2", "mobilenet_v2"] = Field(
        "efficientnet_lite0", description="teacher network (the student mirrors it)")
    pretrained: bool = Field(True, description="teacher weights: the packaged ones or model.weights")
    weights: Optional[str] = Field(None, description="torchvision/lukemelas-format state dict")
    taps: Optional[list[str]] = Field(None, min_length=1, description="teacher stages whose features are distilled "
                                      "(method us: one stage, default the first of the backbone's; default: the "
                                      "backbone's, e.g. efficientnet_lite0 blocks.2, blocks.4, blocks.10)")
    split: Optional[str] = Field(None, description="paste: last teacher stage shared with the student")
    combine: Literal["product", "sum"] = Field("product", description="how per-layer maps combine")
    smoothing_sigma: float = Field(4.0, ge=0, le=64, description="gaussian sigma of the map (0: off)")
    head: Literal["exact", "fast"] = Field(
        "exact", description="scoring head: exact (maps upsampled, then combined and smoothed) or fast (combined at "
        "feature resolution, upsampled once, smoothed by two matrix products, unsorted top-k; "
        "bench/head_equivalence.py checks it). No weights: a checkpoint serves either")
    score_reduction: Literal["max", "topk_mean"] = Field(
        "max", description="image score from the map: its max, or the mean of its top score_topk fraction of "
        "pixels (bench/loco.py compares them leave-one-category-out). No weights: a checkpoint serves either")
    score_topk: float = Field(0.01, gt=0, le=1, description="topk_mean: fraction of map pixels averaged")
    score_pool: int = Field(1, ge=1, le=16, description="the score reads the map average-pooled p x p (a cheaper TopK; "
                            "the map keeps its size; bench/head_equivalence.py checks it); any checkpoint serves")
    image_knn: ImageKnnConfig = Field(default_factory=ImageKnnConfig,
                                        description="image-level nearest-normal evidence added to the score")
    patch_knn: PatchKnnConfig = Field(default_factory=PatchKnnConfig,
                                      description="location-level nearest-normal evidence added to the map")
    students: int = Field(3, ge=1, le=16, description="us: ensemble size")
    descriptor_dim: int = Field(128, ge=8, le=4096, description="us: patch descriptor channels")
    student_width: float = Field(1.0, ge=0.1, le=8, description="rd/us: student width multiplier")

    _weights = field_validator("weights")(_resolve)

    @model_validator(mode="after")
    def _taps_fit(self):
        named = {"taps": self.taps, "image_knn.taps": self.image_knn.taps, "patch_knn.taps": self.patch_knn.taps}
        for name, taps in named.items():
            if taps and listed_twice(name, taps):     # a tap twice would count its map twice
                raise ValueError(listed_twice(name, taps))
        for name in ("image_knn", "patch_knn"):
            if (knn := getattr(self, name)).weight > 0 and self.method == "us":
                raise ValueError(f"{name}: not available for method us (its teacher is a descriptor network)")
            taps = self.taps or DEFAULT_TAPS.get(self.backbone, ())   # refused 20 s into training, not here
            if knn.weight > 0 and knn.taps and taps and not set(knn.taps) <= set(taps):
                raise ValueError(f"{name}.taps must be among model.taps ({', '.join(taps)})")
        return self


class DcamConfig(_Section):
    """DCAM (Jena et al.): training-only attention on the student's maps; never exported."""
    enabled: bool = Field(False, description="train with DCAM attention blocks and loss (stfpm, paste, rd)")
    attention: Literal["channel", "spatial", "cbam"] = Field(
        "cbam", description="attention block per student map: channel, spatial or both (CBAM)")
    reduction: int = Field(16, ge=1, le=1024, description="channel-attention MLP reduction ratio")
    kl_weight: float = Field(1.0, ge=0, le=1000, description="weight of the spatial KL (softmax over H*W per channel)")
    cos_weight: float = Field(1.0, ge=0, le=1000, description="weight of the channel-wise cosine distance")
    feature_weight: float = Field(
        1.0, ge=0, le=1000, description="weight of the method's own loss on the raw student maps (what is exported)")
    temperature: float = Field(1.0, gt=0, le=100, description="softmax temperature of the spatial KL")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, le=10_000, description="passes over the training images")
    batch_size: int = Field(16, ge=1, le=4096, description="images per optimiser step")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="the student's optimiser")
    lr: float = Field(1e-3, gt=0, le=100, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, le=10, description="L2 weight decay")
    momentum: float = Field(0.9, ge=0, le=1, description="sgd only: momentum")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate after warm-up: cosine "
                                                    "decay to 0, or constant")
    warmup_epochs: int = Field(0, ge=0, le=10_000, description="epochs of linear warm-up to train.lr")
    cache_teacher: bool = Field(True, description="precompute frozen teacher features once")
    threads: Optional[int] = Field(None, ge=1, le=MAX_THREADS, description="torch intra-op threads (default: torch's own, "
                                                                      "all cores unless OMP_NUM_THREADS says)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the student trains (auto: cuda when "
                                                   "torch sees a GPU); the checkpoint is always saved for CPU")
    dcam: DcamConfig = Field(DcamConfig(), description="DCAM training option (training only; the export is unchanged)")


class EvalConfig(_Section):
    batch_size: int = Field(16, ge=1, le=4096, description="images per forward pass when scoring the test sets")


class AutoPrecisionConfig(_Section):
    """Budget and effort of ``compile.precision: auto`` (label-free: FP32 vs candidate outputs per category on
    validation normals plus copies with a pasted noise square, and N(0,1) inputs; each figure is the minimum
    over the categories)."""
    spearman_min: float = Field(0.99, ge=-1, le=1, description="min rank correlation of image scores vs FP32")
    decision_agreement_min: float = Field(0.99, ge=0, le=1, description="min share of the same decisions at "
                                          "the FP32 operating threshold")
    top1_overlap_min: float = Field(0.9, ge=0, le=1, description="min overlap of the top-1 % map pixels vs FP32")
    val_images: int = Field(16, ge=1, le=4096, description="validation normals per category the search scores "
                            "(each also with a pasted noise square)")
    random_images: int = Field(16, ge=0, le=4096, description="N(0,1) inputs the search scores")
    sensitivity_images: int = Field(8, ge=1, le=4096, description="of those, per category (and of the N(0,1) "
                                    "inputs), how many rank the groups by their fidelity cost alone; every "
                                    "assignment the search keeps is judged on all of them")
    rank_min_images: int = Field(16, ge=3, le=4096, description="a set (a category's normals and their pasted "
                                 "copies) needs this many images for its own score rank correlation; smaller sets are "
                                 "ranked in the pool of every category (scores standardised per category by the FP32 "
                                 "normals), where one swap among a few images cannot decide the search")
    min_saving: float = Field(0.05, ge=0, le=1, description="a group flips between INT8 and FP32 only if the flip "
                              "saves this share of its FP32 time (and 2 µs when profiled): timing noise must not flip a "
                              "decision. The search's starts (INT8 where faster alone, all FP32, all INT8 per set of "
                              "partitions) are then compared on predicted time alone, so 1 keeps the cheapest start")
    profile_runs: int = Field(100, ge=3, le=1000, description="profiled runs per model (each node's fastest counts)")
    profile_batch: int = Field(1, ge=1, le=64, description="images per profiled run (CPU targets): the deployed batch")
    timing_cache: bool = Field(True, description="keep the profiles in <artifacts>/<recipe>/timing_cache (beside "
                               "--out when that does not exist) so a rerun makes the same speed decisions (delete "
                               "the folder to profile again)")
    gpu: Optional[str] = Field(None, description="TensorRT: the GPU whose modelled latency prices the groups "
                               "(orin-nano-8gb: jetson default, agx-orin-64gb, l4: trt default, h200)")


class CompileConfig(_Section):
    target: str = Field("ort-cpu-int8", description="what `uadc compile` builds without --target (`uadc doctor` "
                        "lists the targets)", json_schema_extra={"enum": list(TARGETS)})   # an editor's check too
    precision: Literal["target", "auto"] = Field("target", description="target: the target's precision on the "
        "compile.quantize partitions; auto: per fused group INT8 or float, the fastest within the compile.auto budget "
        "(CPU INT8 targets: ORT's profile; trt/jetson-int8 with --precision auto: FP16/FP32 too, modelled latency)")
    auto: AutoPrecisionConfig = Field(AutoPrecisionConfig(), description="budget of precision: auto")
    passes: Optional[list[str]] = Field(None, description="override the target's pass list (keep its qdq/fp16/opset, "
                                   "once each; shape_inference and simplify always run first, on the shared export)")
    calibrator: Optional[str] = Field(None, min_length=1, description="default: the target's (entropy for TensorRT)")
    calib_data: Literal["train", "random-normal", "mixed"] = Field("random-normal", description="calibration "
        "inputs: training images, N(0, 1) noise at the input's size, or half of each")
    calib_samples: int = Field(64, ge=1, le=4096, description="calibration inputs")
    quantize: list[Literal["teacher", "student", "head"]] = Field(["student"], min_length=1, description=
        "partitions an INT8 target quantizes at precision: target (auto searches all of them, or --quantize's)")
    per_channel: Optional[bool] = Field(None, description="per-channel weight scales (default: target's)")
    reduce_range: Optional[bool] = Field(None, description="CPU INT8: 7-bit weights, exact without VNNI (default: on)")

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:   # else a whole training ran before `uadc compile` refused it
        if v not in TARGETS:
            raise ValueError(f"{v[:60]!r} is not a target; expected one of {', '.join(TARGETS)}")
        return v


class QatConfig(_Section):
    epochs: int = Field(2, ge=1, le=10_000, description="fine-tuning passes over the training images")
    lr: float = Field(1e-4, gt=0, le=100, description="fine-tuning learning rate")
    batch_size: int = Field(16, ge=1, le=4096, description="images per fine-tuning step")


class DeployConfig(_Section):
    false_alarm_rate: float = Field(0.01, gt=0, lt=0.5, description="target share of normal images (and "
                                    "pixels) flagged; sets the label-free operating thresholds")
    threshold_margin: bool = Field(True, description="threshold = one-sided 95% upper confidence bound of the "
                                   "quantile (shrinks as validation grows; pixels: an estimate); false: plain quantile")
    postprocess: bool = Field(False, description="append pred_score/pred_label/pred_mask to the graph")

    @field_validator("false_alarm_rate")
    @classmethod
    def _distinct_from_zero(cls, v: float) -> float:   # 1 - 1e-17 is 1.0: the bound was NaN, the threshold the max
        if 1.0 - v == 1.0:
            raise ValueError(f"{v:g} is too small to tell from 0 (1 minus it is 1.0 in float64); give at least 1e-15")
        return v


class VerifyConfig(_Section):
    """Budgets of `uadc verify` / `uadc diff` and the golden image set `uadc compile` stores."""
    spearman_min: float = Field(0.9, ge=-1, le=1, description="min rank correlation of image scores")
    decision_agreement_min: float = Field(0.95, ge=0, le=1, description="min share of same decisions at the "
                                          "operating threshold")
    map_dice_min: float = Field(0.7, ge=0, le=1, description="min Dice of maps thresholded at the pixel threshold")
    map_iou_min: float = Field(0.55, ge=0, le=1, description="min IoU of the thresholded maps")
    top1_overlap_min: float = Field(0.7, ge=0, le=1, description="min overlap of the top-1 % map pixels")
    score_ratio_tol: float = Field(0.2, ge=0, le=10, description="max |median(candidate/reference score) - 1|")
    score_shift_max: float = Field(0.5, ge=0, le=100, description="max |median score shift| in reference "
                                   "normal-score standard deviations (per category: with >= 10 normals there)")
    image_auroc_drop_max: float = Field(0.02, ge=0, le=1, description="max image AUROC drop (labelled images)")
    pixel_auroc_drop_max: float = Field(0.02, ge=0, le=1, description="max pixel AUROC drop (labelled images)")
    aupro_drop_max: float = Field(0.03, ge=0, le=1, description="max AUPRO drop (labelled images)")
    per_category: bool = Field(True, description="judge every category too, not only all images together")
    golden_normals: int = Field(32, ge=1, le=4096, description="validation normals per category in the golden set")
    golden_test: int = Field(8, ge=0, le=4096, description="labelled test images per category (half defective)")
    golden_random: int = Field(4, ge=0, le=4096, description="N(0,1) inputs in the golden set")


class RecipeConfig(_Section):
    name: Optional[str] = Field(None, description="artifact folder name; defaults to the file stem")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed for weights init, shuffling, calibration data")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    compile: CompileConfig = CompileConfig()
    qat: QatConfig = QatConfig()
    verify: VerifyConfig = VerifyConfig()
    deploy: DeployConfig = DeployConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not is_output_name(v):
            raise ValueError("must be a plain folder name (no '/', '..', leading '.' or space at either end, valid UTF-8, "
                             "at most 128 bytes)")
        return v


class Recipe:
    """A validated recipe: typed sections read by attribute (``recipe.data.image_size``)."""

    def __init__(self, config: RecipeConfig, path: Path | None = None):
        self.config = config
        self.path = path

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ("config", "path"):   # a read-only property raised Python's AttributeError, not the API's error
            raise UadcError(f"recipe.{name} cannot be replaced: set recipe.config.{name} (checked) or use "
                            f"recipe.with_overrides()")
        object.__setattr__(self, name, value)

    @property
    def data(self) -> DataConfig:
        return self.config.data

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def train(self) -> TrainConfig:
        return self.config.train

    @property
    def eval(self) -> EvalConfig:
        return self.config.eval

    @property
    def compile(self) -> CompileConfig:
        return self.config.compile

    @property
    def qat(self) -> QatConfig:
        return self.config.qat

    @property
    def deploy(self) -> DeployConfig:
        return self.config.deploy

    @property
    def verify(self) -> VerifyConfig:
        return self.config.verify

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def name(self) -> str:
        """``name:``, else the file's stem (``config.name = None`` trained into ``recipe/``), else ``recipe``."""
        stem = self.path.stem if self.path is not None else None
        return self.config.name or (stem if stem and is_output_name(stem) else "recipe")

    @property
    def cfg(self) -> dict:
        """Plain dict of every key (stored in checkpoints; the source of the hashes)."""
        return self.config.model_dump(mode="json", warnings=False)   # a list edited in place is checked on load

    @property
    def hash(self) -> str:
        """The settings' hash, where files live left out: a moved project was another recipe to verify's
        note and eval --one-class (the data's files are fingerprinted apart)."""
        cfg = without_locations(self.cfg)
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def section_hash(self, sections: "str | tuple[str, ...]") -> str:
        """A short hash of the named sections (``"data"`` or ``("data", "model")``)."""
        cfg = self.cfg
        sections = (sections,) if isinstance(sections, str) else tuple(sections)   # "data" hashed 'd', 'a', ...
        unknown = [k for k in sections if k not in cfg]
        if unknown:
            raise UadcError(f"section_hash: no recipe section {unknown[0]!r}; sections are {', '.join(cfg)}")
        blob = json.dumps({k: cfg[k] for k in sections}, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def artifact_dir(self, root: "str | Path | None" = None) -> Path:
        return (Path(root) if root is not None else default_artifacts_root()) / self.name

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the model input in [0, 1] pixel units."""
        kind = self.data.normalization
        if kind == "imagenet":
            return IMAGENET_NORM
        if kind == "unit":
            return UNIT_NORM
        return BACKBONE_NORMALIZATION[self.model.backbone]

    def with_overrides(self, *, relative_to: Path | None = None, **sections: dict) -> "Recipe":
        """A new recipe with ``section={key: value}`` overrides (nested mappings merged, lists replaced),
        validated again; relative paths among them resolve against ``relative_to`` (a sweep file's
        folder), else the recipe's."""
        cfg = copy.deepcopy(self.cfg)
        for section, values in sections.items():
            if isinstance(cfg.get(section), dict):
                if not isinstance(values, dict):
                    raise UadcError(f"override {section}: expected a mapping of {section} keys "
                                    f"({{{section}: {{key: value}}}}), got {type(values).__name__} {values!r:.80}")
                cfg[section] = merged(cfg[section], values)   # {image_knn: {k: 3}} kept its taps
            else:
                cfg[section] = values
        return recipe_from_dict(cfg, self.path, keep_name=True, base=relative_to)

    def __repr__(self) -> str:
        return f"Recipe(name={self.name!r}, path={str(self.path) if self.path else None!r})"


def default_artifacts_root() -> Path:
    return Path.cwd() / "artifacts"


def load_recipe(source: "str | os.PathLike[str] | dict | Recipe") -> Recipe:
    """A recipe from a YAML file, a built-in recipe name (``demo``), a dict or a Recipe (checked again)."""
    if isinstance(source, Recipe):
        return recipe_from_dict(source.cfg, source.path, keep_name=True)
    if isinstance(source, dict):
        return recipe_from_dict(source)
    path = resolve_recipe_path(source)  # a file, or a built-in recipe's name (``demo``)
    check_recipe_file(path, source)
    raw = read_yaml_mapping(path, "recipe", MAX_RECIPE_BYTES)
    check_not_a_sweep_file(raw, path, RecipeConfig.model_fields)
    try:
        return recipe_from_dict(raw, path)
    except UadcError as exc:   # which file: a line that names a key only is no help among several recipes
        named = " ".join(shown(path).split())   # as the error's one line writes it (` a.yaml` is `a.yaml`)
        raise UadcError(str(exc) if str(exc).startswith(named) else f"{named}: {exc}") from None


def recipe_from_dict(raw: dict, path: Path | None = None, keep_name: bool = False, base: Path | None = None) -> Recipe:
    base = base or (path.resolve().parent if path else Path.cwd())
    try:
        config = RecipeConfig.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        raise UadcError(first_error(exc, model=RecipeConfig)) from None
    except RecursionError:
        raise UadcError("recipe: nested too deeply") from None
    if config.name is None and (not keep_name or path is not None):   # with_overrides(name=None): the stem again
        stem = path.stem if path else "recipe"
        if not is_output_name(stem):   # every such recipe trained into one folder, `recipe/`, over the others
            raise UadcError(f"{shown(path)}: its file name is no plain folder name for its artifacts; give the "
                            f"recipe a name: key")
        config = config.model_copy(update={"name": stem})
    _check_semantics(config)
    return Recipe(config, path)


def _check_semantics(cfg: RecipeConfig) -> None:
    """Rules that span keys."""
    m = cfg.model
    if m.pretrained and m.weights is None and m.backbone != "efficientnet_lite0":
        raise UadcError(f"model.weights: backbone {m.backbone!r} has no bundled weights; give a "
                        f"torchvision-format state dict path, or set model.pretrained: false")
    radius = int(4 * m.smoothing_sigma + 0.5)   # the blur's reflect padding needs radius < the map's size
    if radius >= cfg.data.image_size:
        raise UadcError(f"model.smoothing_sigma: {m.smoothing_sigma:g} blurs {radius} px each way, which needs "
                        f"data.image_size > {radius} (it is {cfg.data.image_size}); lower it")
    if cfg.data.image_size % m.score_pool:
        raise UadcError(f"model.score_pool: {m.score_pool} does not divide data.image_size ({cfg.data.image_size})")
    if m.method == "paste" and not m.split:
        raise UadcError("model.split: required for method paste (last teacher stage shared with the student)")
    for key, methods in METHOD_KEYS.items():   # set for another method, it would be ignored
        if m.method not in methods and getattr(m, key) != ModelConfig.model_fields[key].default:
            raise UadcError(f"model.{key}: applies to method {' or '.join(methods)}, not {m.method!r}")
    if m.method == "us" and m.taps and len(m.taps) > 1:    # its students describe one stage: the rest was ignored
        raise UadcError(f"model.taps: method us describes one teacher stage, not {len(m.taps)}; give one, e.g. "
                        f"taps: [{m.taps[-1]}]")
    if len(set(cfg.compile.quantize)) != len(cfg.compile.quantize):
        raise UadcError(f"compile.quantize: a partition is listed twice: {', '.join(cfg.compile.quantize)}")
    if m.weights is not None and not m.pretrained:   # the file was loaded all the same
        raise UadcError("model.weights: given with model.pretrained: false; drop model.weights for a random "
                        "teacher, or set pretrained: true")
    if cfg.deploy.postprocess and cfg.data.val_fraction == 0 and not cfg.data.val:   # refused after training before
        raise UadcError("deploy.postprocess: the in-graph decisions need operating thresholds, set on validation "
                        "normals; set data.val_fraction > 0 or give data.val")
    d = cfg.train.dcam
    if d.enabled and m.method not in ("stfpm", "paste", "rd"):
        raise UadcError(f"train.dcam.enabled: DCAM applies to stfpm, paste and rd, not {m.method!r}")
    if d.enabled and d.kl_weight == 0 and d.cos_weight == 0:
        raise UadcError("train.dcam: kl_weight and cos_weight are both 0 (that is training without DCAM)")


__all__ = ["Recipe", "RecipeConfig", "load_recipe", "recipe_from_dict", "PARTITIONS", "default_artifacts_root"]
