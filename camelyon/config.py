"""Configuration of the Camelyon16 pipeline. Defaults are MONAI ``pathology_tumor_detection`` v0.6.2
(see ../shared/reference/camelyon.md); every field is a command-line flag (``--batch-size 64``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import (BaseConfig, ConfigError, StainAugmentConfig, StainNormalizeConfig, StainTrainConfig,
                           default_cache_dir)
from common.tta import parse_tta


def demo_root() -> str:
    return str(default_cache_dir("camelyon_demo"))


@dataclass
class AugmentConfig(StainAugmentConfig):
    """The bundle's training transforms, applied per 224 patch in this order: ColorJitter
    (uint8 semantics, random order), flip of both axes, rot90, zoom, scaling to [-1, 1]; with
    ``--stain-augment hed`` HED jitter first."""

    brightness: float = 0.25  # ColorJitter brightness factor range 1 +- brightness
    contrast: float = 0.75  # ColorJitter contrast factor range 1 +- contrast
    saturation: float = 0.25  # ColorJitter saturation factor range 1 +- saturation
    hue: float = 0.04  # ColorJitter hue shift range +- hue (fraction of the colour circle)
    flip_prob: float = 0.5  # probability of flipping both axes of a patch
    rot90_prob: float = 0.5  # probability of a rot90 by 1, 2 or 3 quarter turns
    zoom_prob: float = 0.5  # probability of a zoom
    zoom_min: float = 0.9  # smallest zoom factor
    zoom_max: float = 1.1  # largest zoom factor


@dataclass
class TrainConfig(AugmentConfig, StainTrainConfig, BaseConfig):
    """Train the ResNet18 patch classifier on 768-px regions split 3x3 (bundle recipe)."""

    output_dir: str = "runs/camelyon"
    data_root: str = "/workspace/data/medical/pathology"  # the bundle's dataset_dir
    train_list: str = ""  # default <data_root>/training.csv  (.csv bundle | .txt NCRF | .json)
    val_list: str = ""  # default <data_root>/validation.csv
    image_dir: str = ""  # default <data_root>/training/images
    annotation_dir: str = ""  # needed for NCRF .txt lists (grid labels from the polygons)
    slide_suffix: str = ".tif"  # file name ending of the slides in image_dir
    # 0: the slides' headers are read at start-up (they differ: the median, with a warning; none declares one:
    # Camelyon16's 0.243)
    mpp: float = 0.0  # µm/px of the training slides' level 0 (what the model learns); 0 = from the headers
    # recipe
    epochs: int = 4  # passes over the training list
    batch_size: int = 128  # regions per process and step (x9 patches)
    lr: float = 1e-3  # Novograd, cosine over `epochs` stepped per epoch
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # Novograd's two moment decay rates
    weight_decay: float = 0.0  # Novograd weight decay
    seed: int = 15
    shuffle: bool = True  # the bundle's multi-GPU config shuffles; its single-GPU config does not
    num_workers: int = 8
    # initialisation
    # imagenet: torchvision ResNet18_Weights.IMAGENET1K_V1 (the bundle's start; cached by torch.hub, downloaded
    # when absent) | none: random weights | PATH: a resnet18 backbone file (torchvision, SimCLR, MoCo, ...)
    pretrained: str = "imagenet"  # backbone initialisation: imagenet | none | PATH of a resnet18 backbone file
    init_checkpoint: str = ""  # whole model: a bundle model.pt or a project checkpoint (--pretrained imagenet skipped)
    initialisation: str = ""  # written by the run (config.json, checkpoints): what it started from; not an input
    # engineering
    channels_last: bool = True  # used on CUDA (on CPU it does not pay off)
    max_steps_per_epoch: int = 0  # 0 = whole epoch
    max_val_regions: int = 0  # 0 = whole validation list
    checkpoint_every: int = 0  # also save last.pt every N steps (0: at epoch ends only)
    log_every: int = 10  # steps between progress and metrics lines
    val_batch_size: int = 0  # regions per validation batch (0: batch_size)
    demo: bool = False  # synthetic slides, small settings, then whole-slide inference + FROC on the demo test set
    demo_slide_size: list[int] = field(default_factory=lambda: [6144, 8192])  # demo slides' level-0 height, width

    @classmethod
    def demo_preset(cls) -> dict:
        root = demo_root()
        return dict(data_root=root, train_list=f"{root}/training.csv", val_list=f"{root}/validation.csv",
                    image_dir=f"{root}/training/images", output_dir="runs/camelyon_demo",
                    epochs=2, batch_size=4, max_steps_per_epoch=30, num_workers=2, seed=0,
                    checkpoint_every=10, log_every=5, pretrained="none")

    def validate(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be positive")
        if len(self.betas) != 2:
            raise ValueError(f"betas needs two values, got {self.betas}")


@dataclass
class InferConfig(StainNormalizeConfig, BaseConfig):
    """Whole-slide probability maps, lesion candidates (NMS) and exports."""

    slides: str = ""  # a slide file or a folder of slides
    checkpoint: str = ""  # project checkpoint or the bundle's model.pt
    output_dir: str = "outputs/camelyon"
    mode: Literal["dense", "patch"] = "dense"  # dense: fully convolutional tiles | patch: 224 patch per cell (bundle)
    mask_downsample: float = 64.0  # tissue-mask grid cell in network pixels (level 6 of a Camelyon slide)
    dense_engine: Literal["auto", "sparse", "tile"] = "auto"  # dense: layers only where cells need them | whole tiles | auto: sparse on the CPU, tile on a GPU
    tile_cells: int = 40  # dense, tile engine: the largest tile, in cells per side (a memory cap; tiles are planned to hug the tissue)
    sparse_tile_tissue: int = 3072  # dense, sparse engine: most tissue cells in one tile (a memory cap, ~0.3 MB per cell)
    # resolution: the network sees each slide at model_mpp (level-0 px per network px = model_mpp / slide_mpp)
    slide_mpp: float = 0.0  # µm/px of the slides' level 0; 0 = each slide's header (none: assume model_mpp, warn)
    model_mpp: float = 0.0  # µm/px the network was trained at; 0 = the checkpoint's config, 0.243 for model.pt
    mpp_tolerance: float = 0.1  # slides this close (relative) to model_mpp are read at level 0 as they are
    batch_size: int = 400  # patch mode: patches per batch (bundle: 400)
    num_workers: int = 4
    nms_threshold: float = 0.5  # lesion candidates: map cells above this probability
    nms_box: int = 48  # NMS suppression box side in map cells
    nms_sigma: float = 0.0  # Gaussian smoothing of the map before NMS (0: none; NCRF smooths)
    export: list[Literal["geojson", "asap"]] = field(default_factory=list)  # lesion files for QuPath / ASAP
    contours: bool = False  # also export contour polygons of the thresholded map
    channels_last: bool = True  # channels-last memory format on CUDA, and for dense tiles on CPU (1.25x there)
    # restartable folder runs: finished slides are skipped, the slide in progress resumes from its last save
    overwrite: bool = False  # redo slides finished before with the same checkpoint and settings
    flush_every: int = 64  # save the slide in progress every N forward passes (dense: tiles, patch: batches); 0: never
    tta: str = "none"  # test-time augmentation, averaged: none | flips (all 8 dihedral) | hflip | flips4 | names: id,rot90,flip,...
    # --stain-normalize: the source statistics fitted per forward-pass input (patch, or dense tile with its
    # halo) or once per slide (on patches at up to STAIN_FIT_CELLS tissue cells spread over the slide)
    stain_fit: Literal["tile", "slide"] = "tile"  # fit each tile's stain to the target, or each slide's once
    keep_freed_memory: bool = False  # CPU: malloc keeps freed memory for reuse (common/memory.py): 1.46x faster, peak RSS +0.65 GB

    def validate(self) -> None:
        if self.slide_mpp < 0 or self.model_mpp < 0 or not 0 <= self.mpp_tolerance < 1:
            raise ValueError("--slide-mpp and --model-mpp must be >= 0 (0: automatic), --mpp-tolerance in [0, 1)")
        if self.flush_every < 0:
            raise ValueError(f"--flush-every must be >= 0 (0: never save the slide in progress), got {self.flush_every}")
        if self.tile_cells < 1 or self.sparse_tile_tissue < 1:
            raise ValueError(f"--tile-cells and --sparse-tile-tissue must be >= 1, got {self.tile_cells} and "
                             f"{self.sparse_tile_tissue}")
        parse_tta(self.tta)  # an unknown name stops here, before any slide is read


@dataclass
class EvalConfig(StainNormalizeConfig, BaseConfig):
    """Camelyon16 lesion-level FROC (official or bundle protocol, + slide AUC), or patch accuracy."""

    # official: Evaluation_FROC.py (level 5, <slide>.csv detections, normal slides add FPs) -- compare
    #   with NCRF and the challenge. bundle: MONAI LesionFROC as the bundle ran it for its 0.72 (level 6,
    #   <slide>.npy maps -> NMS, 0/1 masks, only slides with a <slide>.tif mask count).
    protocol: Literal["official", "bundle"] = "official"  # official: the challenge's script | bundle: MONAI LesionFROC
    detections: str = ""  # folder of <slide>.csv (probability,X,Y) and/or <slide>.npy maps (bundle)
    ground_truth: str = ""  # folder of <slide>.tif masks or <slide>.xml/.json annotations (official)
    output_dir: str = "outputs/camelyon_eval"
    level: int = -1  # mask level; -1 = the protocol's (official 5, bundle 6)
    spacing_um: float = 0.243  # level-0 pixel size of both protocols
    slides: str = ""  # optional slide folder: level-0 sizes for annotation ground truth
    stem_chars: int = 0  # 8 reproduces the official script's name matching (first 8 characters)
    # patch-level accuracy instead of FROC
    patch_list: str = ""  # a validation patch list (.csv bundle | .txt NCRF | .json): patch accuracy, no FROC
    image_dir: str = ""  # patch accuracy: folder of the slides
    annotation_dir: str = ""  # patch accuracy: annotations for NCRF .txt lists
    checkpoint: str = ""  # patch accuracy: the model to evaluate
    batch_size: int = 32  # patch accuracy: regions per batch
    max_regions: int = 0  # patch accuracy: only the first N regions of the list (0: all)

    def mask_level(self) -> int:
        """The evaluation mask level: ``level`` if set, else 5 (official) or 6 (bundle)."""
        if self.level >= 0:
            return self.level
        return 6 if self.protocol == "bundle" else 5

    def validate(self) -> None:
        if self.level < -1:
            raise ConfigError(f"--level must be >= 0 (or -1 for the protocol's level), got {self.level}")
        if self.protocol == "bundle" and self.stem_chars:
            raise ConfigError("--stem-chars is an official-protocol quirk; the bundle protocol matches "
                             "<slide>.npy to <slide>.tif")
        if not self.patch_list:  # FROC scores probability maps and detections: no image is read here
            if self.stain_normalize != "none":
                raise ConfigError(f"--stain-normalize {self.stain_normalize}: FROC mode scores maps, not images; "
                                  "pass it to camelyon/infer.py (or evaluate patches with --patch-list)")
            if self.stain_target:
                raise ConfigError(f"--stain-target {' '.join(self.stain_target)}: FROC mode scores maps, not images; "
                                  "pass it to camelyon/infer.py (or evaluate patches with --patch-list)")


def mil_demo_root() -> str:
    return str(default_cache_dir("camelyon_mil_demo"))


@dataclass
class FeatureConfig(BaseConfig):
    """Tile features for slide-level MIL: tissue tiles of each slide embedded by a frozen backbone, one
    HDF5 file per slide (``features`` N x D float16, ``coords`` N x 2 level-0 x, y)."""

    slides: str = ""  # a slide file or a folder of slides
    output_dir: str = "runs/camelyon_features"  # <slide>.h5 files, .finished/ records, features.jsonl
    # camelyon: this repo's patch classifier, pooled 512-d | resnet18 / resnet50: torchvision (--weights: a
    # torchvision, timm or self-supervised checkpoint; none: random weights) | resnet50-trunc: CLAM's layer3 1024-d |
    # import: any ResNet file common/backbones.py reads | a foundation model of common/foundation.py (weights needed)
    backbone: str = "resnet18"  # camelyon | resnet18 | resnet50 | resnet50-trunc | import | uni, virchow2, phikon, ...
    weights: str = ""  # local weights file (or HuggingFace folder for phikon); never downloaded
    tile_size: int = 0  # tile side in pixels at tile_mpp; 0 = the backbone's (224; 256 for prov-gigapath, cropped to 224)
    tile_mpp: float = 0.5  # µm/px the tiles are read at (20x); 0 = the backbone's own recommendation
    slide_mpp: float = 0.0  # µm/px of the slides' level 0; 0 = each slide's header
    mpp_tolerance: float = 0.1  # slides this close (relative) to tile_mpp are read at level 0 as they are
    min_tissue: float = 0.25  # a tile is kept when at least this fraction of its 4 x 4 mask cells is tissue
    max_tiles: int = 0  # per slide; 0 = all; else a seeded random subset (eva: 1,000 or 10,000)
    batch_size: int = 64  # tiles per forward pass
    num_workers: int = 2
    overwrite: bool = False  # redo slides finished before with the same backbone, weights and settings

    def validate(self) -> None:
        if 0 < self.tile_size < 16 or self.tile_size < 0 or self.tile_mpp < 0 or self.slide_mpp < 0:
            raise ConfigError("--tile-size must be 0 (the backbone's) or >= 16, --tile-mpp and --slide-mpp >= 0")
        if not 0 < self.min_tissue <= 1:
            raise ConfigError(f"--min-tissue must be in (0, 1], got {self.min_tissue}")
        if self.max_tiles < 0 or self.batch_size < 1:
            raise ConfigError("--max-tiles must be >= 0 and --batch-size >= 1")


@dataclass
class MILConfig(BaseConfig):
    """Slide-level diagnosis by attention MIL (ABMIL, CLAM-SB) on tile features; defaults from CLAM's
    README command (../shared/reference/foundation-mil.md B2)."""

    output_dir: str = "runs/camelyon_mil"
    features: str = ""  # folder of <slide>.h5 feature files (camelyon/features.py)
    # labels, one of: Camelyon16 testing/reference.csv (no header: name, Tumor|Normal, ...) for test_* slides
    # together with --annotations for the training slides, or a CSV of slide,label (label 0/1 or normal/tumor)
    labels: str = ""  # CSV slide,label (header optional)
    reference_csv: str = ""  # Camelyon16 testing/reference.csv
    annotations: str = ""  # folder of lesion annotations (<slide>.xml/.json/.geojson): present = tumour
    split: Literal["official", "folds"] = "official"  # official: test_* slides are the test set | folds: CV only
    folds: int = 5  # k-fold cross-validation on the training slides (stratified); each fold validates on 1/k
    model: Literal["abmil", "clam_sb"] = "clam_sb"  # gated-attention MIL (Ilse 2018) | CLAM single branch
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # CLAM "small": D -> 512 -> attention 256
    dropout: float = 0.25  # after the first layer; also switches on CLAM's dropout 0.25 in the attention branches
    k_sample: int = 8  # CLAM: top/bottom attended tiles per bag for the instance loss
    bag_weight: float = 0.7  # CLAM: total = bag_weight * bag loss + (1 - bag_weight) * instance loss
    inst_loss: Literal["ce", "svm"] = "svm"  # CLAM instance loss: cross-entropy | smooth top-1 SVM
    lr: float = 2e-4  # Adam
    weight_decay: float = 1e-5  # Adam's (CLAM --reg)
    epochs: int = 200  # maximum epochs
    patience: int = 20  # early stopping on validation bag loss (CLAM: 20 epochs without improvement ...)
    stop_epoch: int = 50  # ... and not before this epoch
    weighted_sample: bool = True  # class-balanced sampling (N / N_c per slide, with replacement)
    max_train_tiles: int = 0  # tiles per training bag, a fresh random subset every epoch (0: all)
    bootstrap: int = 1000  # bootstrap resamples of the 95 % confidence intervals
    heatmaps: int = 4  # attention heatmaps (PNG) and top-tile GeoJSON for this many test slides (0: none)
    top_tiles: int = 20  # tiles per slide in the attention GeoJSON
    compare: list[Literal["max-probability"]] = field(default_factory=list)  # baselines in the same table
    maps: str = ""  # --compare max-probability: infer.py output folder (<slide>.npy maps)
    num_workers: int = 0
    demo: bool = False  # synthetic slides -> tile features -> ABMIL, beside the map-maximum baseline
    demo_checkpoint: str = "runs/camelyon_demo/best.pt"  # demo: patch model for the baseline (camelyon/train.py --demo)

    @classmethod
    def demo_preset(cls) -> dict:
        return dict(output_dir="runs/camelyon_mil_demo", model="abmil", epochs=30, stop_epoch=10, patience=5,
                    lr=5e-4, folds=3, seed=0, compare=["max-probability"])

    def validate(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {self.folds}")
        if len(self.hidden) != 2 or min(self.hidden) < 1:
            raise ConfigError(f"--hidden needs two positive widths (fc, attention), got {self.hidden}")
        if not 0 <= self.bag_weight <= 1 or not 0 <= self.dropout < 1:
            raise ConfigError("--bag-weight must be in [0, 1] and --dropout in [0, 1)")
        if self.k_sample < 1 or self.epochs < 1 or self.bootstrap < 0:
            raise ConfigError("--k-sample and --epochs must be >= 1, --bootstrap >= 0")
