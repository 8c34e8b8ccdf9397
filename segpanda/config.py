"""Configuration of the segPANDA200 segmentation task. Defaults are PatchTCGA's ``config.py`` with
the segPANDA branch of its training loop (see ../shared/reference/pretrain-segpanda.md §1, §3, §4,
§7, §9); every field is a command-line flag (``--crop-size 512``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import (BaseConfig, StainAugmentConfig, StainNormalizeConfig, StainTrainConfig,
                           default_cache_dir)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def demo_root() -> str:
    return str(default_cache_dir("segpanda_demo"))


@dataclass
class AugmentConfig(StainAugmentConfig):
    """Device augmentation of training crops (PatchTCGA's segPANDA branch, reference §7), in its
    order: colour jitter p 0.8 and Gaussian blur p 0.5 of the whole tile (image only), then random
    crop and H/V flips replayed on the mask; with ``--stain-augment hed`` HED jitter of the whole
    tile first. ``TrainConfig`` inherits these fields, so they are command-line flags too."""

    crop_size: int = 224
    flip_prob: float = 0.5  # horizontal and vertical, each
    jitter_prob: float = 0.8  # probability of colour jitter per tile
    brightness: float = 0.4  # colour jitter brightness factor range 1 +- brightness
    contrast: float = 0.4  # colour jitter contrast factor range 1 +- contrast
    saturation: float = 0.4  # colour jitter saturation factor range 1 +- saturation
    hue: float = 0.1  # colour jitter hue shift range +- hue (fraction of the colour circle)
    blur_prob: float = 0.5  # probability of a Gaussian blur per tile
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # blur sigma range [min, max] in pixels


@dataclass
class ModelConfig(BaseConfig):
    """What builds the network; shared by training and evaluation."""

    model: Literal["deeplabv3", "vit_upernet", "vit_progressive"] = "deeplabv3"  # segmentation network
    backbone: str = "resnet50"  # resnet18/34/50/101 (deeplabv3) or a timm ViT name, e.g. vit_large_patch16_224
    backbone_layers: list[int] = field(default_factory=list)  # ResNet blocks per stage ([]: the standard depth)
    num_classes: int = 6  # 0 background/unknown, 1 stroma, 2 benign, 3/4/5 Gleason 3/4/5
    aux_loss: bool = False  # DeepLabv3 auxiliary FCN head on layer3 (the released model has none)
    aux_weight: float = 0.5  # torchvision references weight of the auxiliary loss
    vit_indices: list[int] = field(default_factory=list)  # ViT blocks feeding the head ([]: 4 evenly spaced)
    head_channels: int = 256  # width of the ViT heads
    crop_size: int = 224  # training crop (PatchTCGA image_size); the ViT position grid is resized to it
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # RGB normalisation mean
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # RGB normalisation std

    def validate(self) -> None:
        is_vit = self.backbone.startswith("vit_")
        if (self.model == "deeplabv3") == is_vit:
            raise ValueError(f"backbone {self.backbone!r} does not fit model {self.model!r} "
                             "(deeplabv3 takes resnet*, vit_* heads take a timm ViT)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need three values")


@dataclass
class TrainConfig(ModelConfig, AugmentConfig, StainTrainConfig):
    """Fine-tune a segmentation model on segPANDA200 (random crops, CE, AdamW, warm-up + cosine)."""

    output_dir: str = "runs/segpanda"
    data_root: str = "./datasets/segPANDA200"  # <root>/{train,val,test}/<ISUP 0-5>/<slide>/<name>.jpg + _mask.png
    # backbone init. imagenet: torchvision <ResNet>_Weights.IMAGENET1K_V1, as PatchTCGA's DeepLabv3 (cached by
    # torch.hub, downloaded when absent; standard-depth ResNets only, a ViT needs a PATH) | none: random weights |
    # PATH: any backbone checkpoint common.backbones imports (torchvision/timm, SimCLR, MoCo, BYOL, DINO, MAE, runs)
    pretrained: str = "imagenet"  # backbone initialisation: imagenet | none | PATH of a backbone checkpoint
    init_checkpoint: str = ""  # whole-model weights: the released segPANDA200 DeepLabv3 .pt or a run's best.pt
    # (then --pretrained imagenet is skipped: the checkpoint sets the whole network)
    initialisation: str = ""  # written by the run (config.json, checkpoints): what it started from; not an input
    seed: int = 1234
    # recipe (PatchTCGA config.py; the exact settings of the 69.61 model are unverified)
    epochs: int = 5  # passes over the training tiles (the schedule's length)
    max_updates: int = 1000  # stop_num_updates (0: run all epochs)
    batch_size: int = 128  # per process
    lr: float = 1e-4  # at base_batch_size; scaled linearly (real division, not upstream's floor)
    base_batch_size: int = 512  # global batch size at which the peak lr equals lr
    weight_decay: float = 5e-5  # AdamW weight decay
    warmup_epochs: float = 1.0  # linear from lr to the scaled lr, then cosine to min_lr
    min_lr: float = 1e-6  # lr at the end of the cosine
    clip_norm: float = 1.0  # gradient norm clipping (0: off)
    ignore_index: int = -1  # -1: none (PatchTCGA trains and counts class 0)
    class_weights: list[float] = field(default_factory=list)  # [] = unweighted cross-entropy
    # evaluation
    eval_every: int = 200  # updates between validations (also at every epoch end)
    val_crop_size: int = 224  # centre crop of validation/test tiles (PatchTCGA); 0 = whole tile, sliding window
    sw_overlap: float = 0.25  # sliding window: overlap of neighbouring windows (fraction of crop_size)
    sw_batch_size: int = 8  # sliding window: windows per forward pass
    best_metric: str = "patchtcga_miou_macro"  # key of the metrics dict that selects best.pt
    num_overlays: int = 8  # overlay PNGs of test predictions written by rank 0
    validate_values: bool = True  # decode every mask at start-up to check label values (else on load)
    # engineering
    val_batch_size: int = 0  # 0: batch_size (1 when tiles are evaluated whole)
    channels_last: bool = True  # used on CUDA
    checkpoint_every: int = 0  # also save last.pt every N updates
    log_every: int = 10  # updates between progress and metrics lines
    max_steps_per_epoch: int = 0  # 0 = whole epoch
    demo: bool = False  # synthetic tiles in the real layout, small model; prints the test mIoU

    @classmethod
    def demo_preset(cls) -> dict:
        return dict(data_root=demo_root(), output_dir="runs/segpanda_demo", backbone="resnet18",
                    backbone_layers=[1, 1, 1, 1], crop_size=96, val_crop_size=0, batch_size=8, lr=2e-3,
                    base_batch_size=8, weight_decay=1e-4, epochs=7, max_updates=0, warmup_epochs=0.5, eval_every=0,
                    num_workers=2, jitter_prob=0.5, brightness=0.1, contrast=0.1, saturation=0.1,
                    hue=0.02, blur_prob=0.2, blur_sigma=[0.1, 1.0], log_every=10, sw_batch_size=4,
                    pretrained="none")

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.epochs < 1 or self.crop_size < 16:
            raise ValueError("batch_size and epochs must be positive and crop_size >= 16")
        if self.class_weights and len(self.class_weights) != self.num_classes:
            raise ValueError(f"class_weights needs {self.num_classes} values, got {len(self.class_weights)}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be [min, max] with 0 < min <= max, got {self.blur_sigma}")


@dataclass
class EvalConfig(ModelConfig, StainNormalizeConfig):
    """Evaluate a checkpoint on a split: mIoU (both variants), Dice, pixel accuracy, overlays."""

    output_dir: str = "outputs/segpanda"
    data_root: str = "./datasets/segPANDA200"  # <root>/{train,val,test}/<ISUP 0-5>/<slide>/<name>.jpg + _mask.png
    split: Literal["train", "val", "test"] = "test"  # the split evaluated
    checkpoint: str = ""  # a run's best.pt/last.pt or the released segPANDA200 DeepLabv3 state_dict
    val_crop_size: int = 224  # 0 = whole tiles with sliding-window inference at crop_size
    sw_overlap: float = 0.25  # sliding window: overlap of neighbouring windows (fraction of crop_size)
    sw_batch_size: int = 8  # sliding window: windows per forward pass
    batch_size: int = 16  # tiles per batch
    ignore_index: int = -1  # label not counted in the metrics (-1: none)
    num_overlays: int = 16  # overlay PNGs of predictions written
    validate_values: bool = True  # decode every mask at start-up to check label values (else on load)
    use_checkpoint_config: bool = True  # a run's checkpoint sets the model fields (model, backbone, crop, ...)
