"""Configuration of the spleen CT pipeline. Defaults are the MONAI ``spleen_ct_segmentation`` bundle
v0.5.9 (see ../shared/reference/spleen.md); every field is a command-line flag (``--roi-size 96 96 96``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import BaseConfig, ConfigError, default_cache_dir


def demo_root() -> str:
    return str(default_cache_dir("spleen_demo"))


def _check_window(cfg) -> None:
    if not 0 <= cfg.sw_overlap < 1:
        raise ConfigError(f"--sw-overlap must be in [0, 1), got {cfg.sw_overlap}")
    if len(cfg.roi_size) != 3 or min(cfg.roi_size) < 1:
        raise ConfigError(f"--roi-size needs three positive sizes, got {cfg.roi_size}")


@dataclass
class TrainConfig(BaseConfig):
    """Train the residual 3-D UNet on MSD Task09 (bundle recipe)."""

    output_dir: str = "runs/spleen"
    data_root: str = "/workspace/data/Task09_Spleen"  # MSD layout: imagesTr/, labelsTr/
    data_list: str = ""  # optional JSON {"training": [{"image", "label"}], "validation": [...]}
    val_count: int = 9  # the last 9 sorted cases validate (bundle)
    cache_dir: str = ""  # preprocessed volumes; default <output_dir>/cache
    # preprocessing
    pixdim: list[float] = field(default_factory=lambda: [1.5, 1.5, 2.0])  # voxel spacing (mm) volumes are resampled to
    hu_range: list[float] = field(default_factory=lambda: [-57.0, 164.0])  # HU window scaled to [0, 1], clipped
    # crops
    roi_size: list[int] = field(default_factory=lambda: [96, 96, 96])  # training crop size (voxels)
    num_samples: int = 4  # crops per volume; a batch of 2 volumes = 8 crops
    pos: float = 1.0  # weight of crops centred on spleen voxels (RandCropByPosNegLabeld)
    neg: float = 1.0  # weight of crops centred on background voxels
    intensity_shift: float = 0.0  # RandShiftIntensity offsets (tutorial 0.1; not in the bundle)
    intensity_shift_prob: float = 0.5  # probability of the intensity shift per crop
    # network
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # UNet widths per level
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # down-sampling between levels
    num_res_units: int = 2  # residual units per UNet block
    # optimisation
    epochs: int = 800  # passes over the training volumes
    batch_size: int = 2  # volumes per process and step
    lr: float = 2e-3  # Novograd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # Novograd's two moment decay rates
    weight_decay: float = 0.0  # Novograd weight decay
    lr_step_size: int = 5000  # StepLR per epoch (never fires within 800 epochs)
    lr_gamma: float = 0.1  # StepLR factor
    seed: int = 123
    num_workers: int = 4
    # validation: sliding window in the resampled space
    val_every: int = 1  # epochs between validations
    sw_batch_size: int = 4  # windows per forward pass
    sw_overlap: float = 0.5  # overlap of neighbouring windows (fraction of roi_size)
    sw_mode: Literal["constant", "gaussian"] = "constant"  # blending of overlapping windows (bundle: constant)
    # engineering
    init_checkpoint: str = ""  # start from the bundle's model.pt or a project checkpoint
    sync_bn: bool = False  # SyncBatchNorm under DDP (the bundle uses plain BN per process)
    channels_last: bool = False  # channels_last_3d activations (try on recent GPUs)
    max_steps_per_epoch: int = 0  # 0 = whole epoch
    checkpoint_every: int = 0  # also save last.pt every N steps (0: at epoch ends)
    log_every: int = 10  # steps between progress and metrics lines
    # demo: synthetic MSD-layout CT, train, validate, then infer.py + eval.py on the demo test cases
    demo: bool = False  # synthetic CT in the MSD layout, small settings, then inference and evaluation
    demo_cases: int = 10  # synthetic volumes generated for the demo

    @classmethod
    def demo_preset(cls) -> dict:
        return dict(data_root=demo_root(), output_dir="runs/spleen_demo", val_count=2, roi_size=[32, 32, 32],
                    sw_batch_size=16, epochs=30, num_workers=2, seed=0, log_every=5, val_every=10)

    def validate(self) -> None:
        _check_window(self)
        if self.batch_size < 1 or self.epochs < 1 or self.num_samples < 1:
            raise ConfigError("batch_size, epochs and num_samples must be positive")
        if len(self.pixdim) != 3 or min(self.pixdim) <= 0:
            raise ConfigError(f"--pixdim needs three positive spacings, got {self.pixdim}")
        if len(self.hu_range) != 2 or self.hu_range[0] >= self.hu_range[1]:
            raise ConfigError(f"--hu-range needs min < max, got {self.hu_range}")
        if len(self.strides) != len(self.channels) - 1:
            raise ConfigError(f"need len(strides) == len(channels) - 1, got {self.channels} / {self.strides}")
        divisor = 1
        for s in self.strides:
            divisor *= s
        if any(r % divisor for r in self.roi_size):
            raise ConfigError(f"--roi-size {self.roi_size} must be divisible by {divisor} (the UNet's down-sampling)")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg <= 0:
            raise ConfigError(f"--pos/--neg must be non-negative with a positive sum, got {self.pos}/{self.neg}")


@dataclass
class PredictionConfig:
    """How a preprocessed volume becomes logits (inference and benchmark); defaults: the bundle's
    sliding window, with the exact-within-rounding speed-ups on."""

    prediction: Literal["sliding_window", "whole_volume"] = "sliding_window"  # whole_volume: the UNet on the whole padded volume at once, ~5x faster, no window blending (README)
    roi_size: list[int] = field(default_factory=lambda: [96, 96, 96])  # sliding-window size (voxels); whole_volume pads to at least this
    sw_batch_size: int = 4  # windows per forward pass
    sw_overlap: float = 0.5  # overlap of neighbouring windows (fraction of roi_size)
    sw_mode: Literal["constant", "gaussian"] = "constant"  # blending of overlapping windows (bundle: constant)
    block_size: list[int] = field(default_factory=lambda: [0, 0, 0])  # whole_volume: blocks of this core size (multiples of 16, 0 = whole axis) when the activations do not fit
    halo: int = 96  # whole_volume blocks: context voxels on each side (>= 93, the receptive field's radius, gives the one-pass result)
    channels_last: bool = True  # channels-last-3d weights and inputs (~13% faster on CPU; logits within float rounding)
    fold_batchnorm: bool = True  # fold each BatchNorm into its convolution (one pass less per layer; logits within float rounding)
    keep_freed_memory: bool = True  # CPU: malloc keeps freed memory for reuse, no page faults per activation (~30% faster; peak memory held until exit)


def _check_prediction(cfg: PredictionConfig) -> None:
    _check_window(cfg)
    if len(cfg.block_size) != 3 or min(cfg.block_size) < 0 or any(b % 16 for b in cfg.block_size):
        raise ConfigError(f"--block-size needs three multiples of 16 (0 = the whole axis), got {cfg.block_size}")
    if cfg.halo < 0:
        raise ConfigError(f"--halo must be >= 0, got {cfg.halo}")


@dataclass
class InferConfig(PredictionConfig, BaseConfig):
    """Segment CT volumes: preprocess, sliding window (or whole volume), invert to the original grid,
    write NIfTI + PNG; a killed run restarted with the same command skips the finished volumes."""

    images: str = ""  # a NIfTI file or a folder of them
    checkpoint: str = ""  # the bundle's model.pt or a project checkpoint (best.pt)
    output_dir: str = "outputs/spleen"
    pixdim: list[float] = field(default_factory=lambda: [1.5, 1.5, 2.0])  # voxel spacing (mm) volumes are resampled to
    hu_range: list[float] = field(default_factory=lambda: [-57.0, 164.0])  # HU window scaled to [0, 1], clipped
    sw_on_cpu: bool = False  # accumulate the blended output on the CPU (very large scans on a small GPU)
    overwrite: bool = False  # redo volumes finished before with the same checkpoint and settings
    largest_component: bool = False  # keep only the largest connected component (not in the bundle)
    preview: bool = True  # <name>_preview.png with three orthogonal slices and the contour

    def validate(self) -> None:
        _check_prediction(self)
        if not self.images or not self.checkpoint:
            raise ConfigError("--images and --checkpoint are required")


@dataclass
class EvalConfig(BaseConfig):
    """Dice and HD95 (mm) of predicted label maps against ground truth, in the original space."""

    predictions: str = ""  # folder of <name>_seg.nii.gz (or <name>.nii.gz)
    labels: str = ""  # folder of <name>.nii.gz
    output: str = ""  # JSON report; default <predictions>/metrics.json

    def validate(self) -> None:
        if not self.predictions or not self.labels:
            raise ConfigError("--predictions and --labels are required")


@dataclass
class BenchConfig(PredictionConfig, BaseConfig):
    """Inference time, peak memory and agreement: this project's sliding window (exact and as infer.py
    runs it), MONAI's (when importable), the naive one-window loop and the whole-volume mode."""

    shapes: list[str] = field(default_factory=lambda: ["fixture", "512x512x200"])  # preprocessed volumes: "fixture" (the real CT, resampled) or XxYxZ
    fixture: str = ""  # CT NIfTI read for "fixture" (empty: the shared fixtures' example_ct.nii.gz)
    checkpoint: str = ""  # optional weights (random bundle-architecture weights otherwise)
    naive: bool = True  # also time one window at a time, no batching
    monai: bool = True  # also time MONAI's sliding_window_inference when MONAI is importable
    output_dir: str = ""  # also write the results as bench.json here

    def validate(self) -> None:
        _check_prediction(self)
        for shape in self.shapes:
            if shape != "fixture" and not parse_shape(shape):
                raise ConfigError(f"--shapes: {shape!r} is neither 'fixture' nor XxYxZ with positive sizes")


def parse_shape(text: str) -> tuple[int, ...] | None:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    return tuple(int(p) for p in parts)
