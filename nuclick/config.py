"""Configuration of the NuClick pipeline. Defaults are MONAI ``pathology_nuclick_annotation`` v0.2.1
(see ../shared/reference/nuclick.md); every field is a command-line flag (``--batch-size 64``)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from common.config import (BaseConfig, ConfigError, StainAugmentConfig, StainNormalizeConfig, StainTrainConfig,
                           default_cache_dir)


#: µm/px of CoNSeP (40x; nuclick.md does not state it, 0.25 is the usual 40x pixel): the bundle's
#: ``model.pt`` was trained at it
CONSEP_MPP = 0.25
#: BasicUNet widths of the released bundle: encoder levels 0-4, then the last decoder level
BUNDLE_FEATURES = (32, 64, 128, 256, 512, 32)
#: spatial order of the network's input: hw = (row, col) as stored, wh = MONAI's transposed layout
AxisOrder = Literal["hw", "wh"]
AXIS_ORDERS: tuple[str, ...] = typing.get_args(AxisOrder)


def demo_root() -> str:
    return str(default_cache_dir("nuclick_demo"))


# ----------------------------------------------------------------------------- field groups
# Fields several commands share, declared once; the commands' configs inherit them (so they are
# flags there), and dataset.py / guidance.py take the groups themselves.
@dataclass
class AugmentConfig(StainAugmentConfig):
    """The bundle's training transforms, in order (nuclick.md §5); with ``--stain-augment hed`` HED
    jitter first."""

    brightness: float = 0.251  # ColorJitter, applied to every crop
    contrast: float = 0.75  # ColorJitter contrast factor range 1 +- contrast
    saturation: float = 0.25  # ColorJitter saturation factor range 1 +- saturation
    hue: float = 0.04  # ColorJitter hue shift range +- hue (fraction of the colour circle)
    flip_prob: float = 0.5  # flips both axes together (a 180-degree turn)
    rot90_prob: float = 0.5  # probability of a rot90 by 1, 2 or 3 quarter turns


@dataclass
class ClickSamplingConfig:
    """How the clicks of a crop are drawn from its labels (training and validation)."""

    drop_rate: float = 0.5  # negative-click drop rate in training (whole map, then each nucleus)
    use_distance: bool = True  # positive click ~ exp(chessboard distance) - 1


@dataclass
class ClickSmoothingConfig:
    """The optional Gaussian smoothing of the click maps (training and inference)."""

    gaussian: bool = False  # smooth the click maps (sigma, truncated)
    sigma: float = 1.0  # Gaussian sigma of the click maps in pixels
    truncated: float = 2.0  # Gaussian truncated at this many sigmas


@dataclass
class GuidanceConfig(ClickSmoothingConfig, ClickSamplingConfig):
    """MONAI ``AddPointGuidanceSignald`` settings (bundle: use_distance, no Gaussian). Fields in the
    order drop_rate, use_distance, gaussian, sigma, truncated (dataclasses list the last base first)."""


@dataclass
class NetworkConfig:
    """The BasicUNet's widths."""

    features: list[int] = field(default_factory=lambda: list(BUNDLE_FEATURES))  # encoder levels 0-4, last decoder


@dataclass
class CropsConfig:
    """The per-nucleus crops written by prepare.py."""

    data_root: str = "/workspace/data/CoNSePNuclei"  # prepare.py's output
    datalist: str = ""  # default <data_root>/dataset.json


@dataclass
class WeightsConfig:
    """The trained network to load."""

    checkpoint: str = ""  # project checkpoint or the bundle's model.pt
    axis_order: Literal["", AxisOrder] = ""  # override the checkpoint's axis order; empty: detect


@dataclass
class PrepareConfig(BaseConfig):
    """Cut one crop per nucleus from CoNSeP (or HoVer-Net-style maps) and write dataset.json."""

    input: str = "/workspace/data/CoNSeP"  # <input>/{Train,Test}/{Images,Labels}
    output: str = "/workspace/data/CoNSePNuclei"  # folder for the crops and dataset.json
    crop_size: int = 128  # crop side in pixels, centred on each nucleus
    min_area: int = 80  # skip nuclei with fewer pixels inside their crop
    min_distance: int = 20  # skip nuclei whose centroid is closer than this to the image border
    limit: int = 0  # stop a split after this many crops (0: no limit)
    # Train -> the "training" list of dataset.json, Test -> "validation"
    splits: list[Literal["Train", "Test"]] = field(default_factory=lambda: ["Train", "Test"])  # CoNSeP folders cut

    def validate(self) -> None:
        if self.crop_size < 16 or self.min_area < 0 or self.min_distance < 0 or self.limit < 0:
            raise ConfigError("crop_size >= 16 and non-negative min_area, min_distance, limit are required")


@dataclass
class TrainConfig(AugmentConfig, GuidanceConfig, NetworkConfig, CropsConfig, StainTrainConfig, BaseConfig):
    """Train the NuClick BasicUNet on per-nucleus crops with click guidance (bundle recipe)."""

    output_dir: str = "runs/nuclick"
    # recipe
    epochs: int = 50  # passes over the training crops
    batch_size: int = 64  # per process
    lr: float = 1e-4  # Adam, no schedule
    seed: int = 123
    num_workers: int = 4
    # features, augmentation (AugmentConfig) and guidance (GuidanceConfig) are inherited
    val_drop_rate: float = 1.0  # validation: no negative clicks
    cache: bool = True  # decode every crop once at start-up (the bundle's CacheDataset)
    # initialisation and engineering
    init_checkpoint: str = ""  # start from the bundle's model.pt (axis order "wh") or a project checkpoint
    mpp: float = CONSEP_MPP  # µm/px of the training crops (CoNSeP 40x); recorded for infer.py's slide reading
    axis_order: AxisOrder = "hw"  # hw: images as stored; wh: MONAI's transposed layout (set by init_checkpoint)
    channels_last: bool = True  # CUDA only (slower on CPU)
    max_steps_per_epoch: int = 0  # 0 = whole epoch
    max_val: int = 0  # 0 = whole validation list
    val_batch_size: int = 0  # 0 = batch_size
    checkpoint_every: int = 0  # also save last.pt every N steps (0: at epoch ends only)
    log_every: int = 10  # steps between progress and metrics lines
    preview: bool = True  # val_preview.png with clicks, ground truth and prediction each epoch
    # demo: synthetic CoNSeP-format set -> prepare.py -> train -> infer.py on a demo image
    demo: bool = False  # synthetic CoNSeP-format set, small settings, then inference on a demo image
    demo_images: int = 12  # synthetic training tiles (validation / test: a third of it)
    demo_size: int = 256  # tile side in pixels
    demo_crop: int = 64  # crop and click-box size of the demo (the recipe's 128 learns too slowly on CPU)

    @classmethod
    def demo_preset(cls) -> dict:
        root = demo_root()
        # reduced width and crop: the bundle's 7.8M-parameter net on 128 crops cannot learn in
        # 10 minutes on 2 CPU cores; lr 1e-3 instead of 1e-4 for the same reason
        return dict(data_root=f"{root}/prepared", output_dir="runs/nuclick_demo", epochs=6, batch_size=16,
                    lr=1e-3, num_workers=1, seed=0, features=[16, 32, 64, 128, 256, 16], log_every=10)

    def validate(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("batch_size and epochs must be positive")
        if len(self.features) != 6:
            raise ConfigError(f"features needs 6 widths, got {self.features}")
        if not (0.0 <= self.drop_rate <= 1.0 and 0.0 <= self.val_drop_rate <= 1.0):
            raise ConfigError("drop rates must lie in [0, 1]")


@dataclass
class InferConfig(ClickSmoothingConfig, WeightsConfig, StainNormalizeConfig, BaseConfig):
    """Interactive segmentation: one nucleus per click, merged into an instance map."""

    image: str = ""  # PNG/JPEG/TIFF, or a whole-slide image (read around the clicks only)
    clicks: str = ""  # CSV of x,y rows | JSON list | GeoJSON points (QuPath)
    output_dir: str = "outputs/nuclick"
    bb_size: int = 128  # box around each click
    batch_size: int = 32  # clicks per forward pass
    threshold: float = 0.5  # probability above which a pixel belongs to the clicked nucleus
    post_filter: bool = False  # remove small objects and holes (MONAI PostFilterLabeld)
    min_size: int = 10  # post_filter: objects smaller than this (pixels) are removed
    min_hole: int = 30  # post_filter: holes smaller than this (pixels) are filled
    max_region_pixels: int = 64_000_000  # larger images are read around the clicks only
    # whole-slide images are read at model_mpp (level-0 px per network px = model_mpp / slide_mpp)
    slide_mpp: float = 0.0  # µm/px of the slide's level 0; 0 = its header (none: assume model_mpp, warn)
    model_mpp: float = 0.0  # µm/px the network was trained at; 0 = the checkpoint's config, 0.25 for model.pt
    mpp_tolerance: float = 0.1  # slides this close (relative) to model_mpp are read at level 0 as they are
    channels_last: bool = True  # channels-last memory format on CUDA

    def validate(self) -> None:
        if self.bb_size < 16 or self.batch_size < 1:
            raise ConfigError("bb_size >= 16 and batch_size >= 1 are required")
        if self.slide_mpp < 0 or self.model_mpp < 0 or not 0 <= self.mpp_tolerance < 1:
            raise ConfigError("slide_mpp and model_mpp must be >= 0 (0: automatic), mpp_tolerance in [0, 1)")


@dataclass
class EvalConfig(WeightsConfig, CropsConfig, StainNormalizeConfig, BaseConfig):
    """Validation Dice of a checkpoint on prepared crops, or instance Dice of an inference result."""

    output_dir: str = "outputs/nuclick_eval"
    split: Literal["training", "validation"] = "validation"  # the list of dataset.json evaluated
    batch_size: int = 64  # crops per batch
    seed: int = 123  # positive clicks are sampled (as in the bundle's evaluation)
    # instance-level evaluation of infer.py's output instead
    instances: str = ""  # <stem>_instances.png
    ground_truth: str = ""  # CoNSeP .mat, or an instance map (.npz / .png)


@dataclass
class ExportConfig(WeightsConfig, BaseConfig):
    """TorchScript and ONNX export of a checkpoint, checked against PyTorch."""

    output_dir: str = "outputs/nuclick_export"
    formats: list[Literal["torchscript", "onnx"]] = field(default_factory=lambda: ["torchscript", "onnx"])  # written
    bb_size: int = 128  # example input size; batch and spatial axes stay dynamic in ONNX
    opset: int = 17  # ONNX opset version
    atol: float = 1e-4  # largest absolute difference to PyTorch's output accepted


@dataclass
class BenchConfig(NetworkConfig, BaseConfig):
    """Throughput of the training step, the batch pipeline and click inference (prints numbers)."""

    batch_size: int = 16  # crops per training step and clicks per inference batch
    crop_size: int = 128  # crop side in pixels
    steps: int = 5  # timed iterations after one warm-up
    clicks: int = 64  # clicks on a synthetic 512x512 image for the inference timing
