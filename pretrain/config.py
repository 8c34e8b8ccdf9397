"""Configuration of PCam200 / PTCGA200 fine-tuning. Defaults are PatchTCGA's committed PCam200
recipe (see ../shared/reference/pretrain-segpanda.md §1, §9); every field is a ``--flag``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.config import (BaseConfig, StainAugmentConfig, StainNormalizeConfig, StainTrainConfig,
                           default_cache_dir)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def demo_root() -> str:
    return str(default_cache_dir("pretrain_demo") / "PCam200")


@dataclass
class FinetuneConfig(StainAugmentConfig, StainTrainConfig, BaseConfig):
    """Fine-tune (or linear-probe) a backbone on PCam200 / PTCGA200 classification."""

    output_dir: str = "runs/pcam200_finetune"
    # pcam200: root/{train,val,test}/{normal,tumor}/<case>/<img> | pcam_h5: PCam's {split}_{x,y}.h5 | ptcga200
    dataset: Literal["pcam200", "pcam_h5", "ptcga200"] = "pcam200"  # classification set and its layout on disk
    data_root: str = "./datasets/PCam200"  # folder (pcam200, ptcga200) or folder of PCam {split}_{x,y}.h5
    split_file: str = ""  # ptcga200: 3fold_dict_idx_filenames.pickle (default <data_root>/..)
    fold: str = "0"  # ptcga200: fold of the 3-fold split
    # model
    arch: str = "resnet50"  # torchvision resnet* | timm vit_* name
    backbone: str = ""  # checkpoint of any format common.backbones imports (SimCLR, MoCo, BYOL, DINO, MAE, ...)
    dropout: float = 0.4  # Dropout before the final Linear
    linear_probe: bool = False  # frozen backbone (BN in eval mode), train only the head
    # recipe
    epochs: int = 5  # passes over the training split (the schedule's length)
    max_updates: int = 1000  # PatchTCGA stops after 1000 updates (0: no cap)
    batch_size: int = 128  # per process
    base_batch_size: int = 512  # peak lr = lr * global batch / base_batch_size (real division)
    lr: float = 1e-4  # AdamW lr at base_batch_size
    weight_decay: float = 5e-5  # not on biases and norm parameters
    warmup_epochs: float = 1.0  # linear from lr (update 1) to the scaled lr, then cosine over all epochs
    min_lr: float = 1e-6  # added to the cosine (PatchTCGA's + 1e-6): the lr of the last planned update
    clip_norm: float = 1.0  # gradient norm clipping (0: off)
    image_size: int = 224  # network input side in pixels
    eval_crop: int = 287  # centre crop before resizing to image_size (0: resize the whole patch)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # RandomResizedCrop area range (antialiased)
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # colour jitter, p 0.8
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur, p 0.5
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # RGB normalisation mean
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # RGB normalisation std
    seed: int = 1234
    num_workers: int = 4
    # engineering
    eval_every: int = 200  # validate every N updates (and at each epoch end)
    channels_last: bool = True  # used on CUDA
    log_every: int = 10  # updates between progress and metrics lines
    checkpoint_every: int = 0  # also save last.pt every N updates
    max_eval_samples: int = 0  # 0: the whole split
    demo: bool = False  # synthetic PCam200-layout patches and a small network (minutes on CPU)

    @classmethod
    def demo_preset(cls) -> dict:
        return dict(data_root=demo_root(), output_dir="runs/pcam200_demo", arch="resnet18", epochs=2,
                    max_updates=0, batch_size=32, base_batch_size=32, lr=1e-3, weight_decay=0.0,
                    warmup_epochs=0.3, image_size=64, eval_crop=72, blur_sigma=[0.1, 1.0], num_workers=2,
                    eval_every=0, seed=0)

    def validate(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be positive")
        if len(self.crop_scale) != 2 or len(self.jitter) != 4 or len(self.blur_sigma) != 2:
            raise ValueError("crop_scale needs 2 values, jitter 4, blur_sigma 2")

    @property
    def num_classes(self) -> int:
        return 20 if self.dataset == "ptcga200" else 2


@dataclass
class EvalConfig(StainNormalizeConfig, BaseConfig):
    """Evaluate a fine-tuned checkpoint on one split: metrics JSON + ROC curve PNG."""

    checkpoint: str = ""  # best.pt / last.pt of a fine-tuning run (its config gives arch and data)
    split: str = "test"  # the split evaluated (train | val | test)
    data_root: str = ""  # default: the run's data_root
    output_dir: str = ""  # default: <checkpoint folder>/eval_<split>
    batch_size: int = 64  # patches per batch
    num_workers: int = 2


# ============================================================================= self-supervised pretraining
IMAGENET = dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
# Recipe defaults per method (reference §7-8). ``lr`` is the base lr at ``base_batch_size``: the
# peak lr is lr * global batch / base_batch_size. Fields left at None take these values.
# MAE keeps upstream's 40 warm-up epochs: with the 40 epochs of the PTCGA200 runs the whole run
# warms up (the half-cosine needs --epochs above 40, upstream ran 400-1600).
METHOD_DEFAULTS: dict[str, dict] = {
    "simclr": dict(arch="resnet50", batch_size=64, lr=0.3, base_batch_size=256, optimizer="lars", weight_decay=1e-6,
                   warmup_epochs=4.0, min_lr=0.0, clip_norm=0.0, temperature=0.1, proj_hidden=2048, proj_dim=128,
                   sync_bn=True, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]),
    "moco": dict(arch="resnet50", batch_size=32, lr=0.03, base_batch_size=256, optimizer="sgd", weight_decay=1e-4,
                 warmup_epochs=0.0, min_lr=0.0, clip_norm=0.0, temperature=0.2, proj_hidden=0, proj_dim=128,
                 sync_bn=False, **IMAGENET),
    "byol": dict(arch="resnet50", batch_size=64, lr=0.45, base_batch_size=512, optimizer="lars", weight_decay=1e-6,
                 warmup_epochs=10.0, min_lr=1e-6, clip_norm=0.0, proj_hidden=4096, proj_dim=256, ema_start=0.99,
                 sync_bn=True, temperature=0.0, **IMAGENET),
    "dino": dict(arch="vit_small_patch16_224", batch_size=64, lr=5e-4, base_batch_size=256, optimizer="adamw",
                 weight_decay=0.04, weight_decay_end=0.4, warmup_epochs=10.0, min_lr=1e-6, clip_norm=3.0,
                 temperature=0.1, proj_hidden=2048, proj_dim=256, ema_start=0.996, sync_bn=False, **IMAGENET),
    "mae": dict(arch="vit_large_patch16_224", batch_size=64, lr=1.5e-4, base_batch_size=256, optimizer="adamw",
                weight_decay=0.05, warmup_epochs=40.0, min_lr=0.0, clip_norm=0.0, temperature=0.0, proj_hidden=0,
                proj_dim=0, sync_bn=False, **IMAGENET),
}
# Small models on 64-px crops of the synthetic 96-px demo patches: minutes on 2 CPU cores.
DEMO_DEFAULTS: dict[str, dict] = {
    "simclr": dict(arch="resnet18", epochs=8, lr=1.0, batch_size=64, proj_hidden=512, warmup_epochs=1.0),
    # MoCo: a queue smaller than the 1,050-image demo set, else each query's own image (its key
    # from the previous epoch) sits in the queue as a negative and the loss rises as features improve.
    "moco": dict(arch="resnet18", epochs=8, lr=0.06, batch_size=64, queue_size=256, moco_momentum=0.99, proj_hidden=512,
                 temperature=0.2),
    "byol": dict(arch="resnet18", epochs=6, lr=4.0, batch_size=64, proj_hidden=1024, proj_dim=128, warmup_epochs=1.0),
    # DINO: a ResNet18 (DINO supports ResNets): tiny random-init ViTs give near-identical features
    # at 64 px, so after centring the 0.04 teacher is near uniform and training collapses to it;
    # a sharper teacher (0.01) on a 256-d output learns. The loss can rise while the teacher's
    # entropy rises; its KL part (logged as ``kl``) falls.
    "dino": dict(arch="resnet18", epochs=4, lr=1e-3, batch_size=64, dino_out_dim=256, teacher_temp=0.01,
                 warmup_teacher_temp=0.01, proj_hidden=512, proj_dim=128, warmup_epochs=1.0, n_local=4,
                 local_size=32, drop_path=0.0, ema_start=0.99),
    "mae": dict(arch="vit_small_patch8_224", epochs=12, vit_embed_dim=192, vit_depth=4, vit_num_heads=3, lr=1.5e-3,
                batch_size=64, decoder_dim=128, decoder_depth=2, decoder_heads=4, warmup_epochs=1.0),
}


def ssl_demo_root() -> str:
    return str(default_cache_dir("pretrain_ssl_demo"))


@dataclass
class PretrainConfig(BaseConfig):
    """Self-supervised pretraining on pathology patches: SimCLR, MoCo v2, BYOL, DINO or MAE."""

    output_dir: str = ""  # default runs/pretrain_<method>
    method: Literal["simclr", "moco", "byol", "dino", "mae"] = "simclr"  # self-supervised method
    # data: a pack root (<root>/{train,val}/index.json from pretrain/pack.py) or an image folder
    data_root: str = "./datasets/PTCGA200"  # a pack root from pretrain/pack.py, or an image folder (see --layout)
    layout: Literal["ptcga200", "pcam200", "pcam_h5", "folder"] = "ptcga200"  # data_root's layout if not packed
    split_file: str = ""  # ptcga200: 3fold_dict_idx_filenames.pickle (default <data_root>/..)
    fold: str = "0"  # ptcga200: fold of the 3-fold split
    pack_dir: str = ""  # where an image folder is packed (default <output_dir>/packed)
    shard_size: int = 10000  # images per HDF5 shard when packing
    on_error: Literal["skip", "error"] = "skip"  # unreadable images while packing: skip (counted, listed) | error
    # model
    arch: str | None = None  # torchvision resnet* | timm vit_* (default: the method's recipe backbone)
    vit_patch_size: int = 0  # ViT patch size (0: from the name); these vit_* fields make small variants
    vit_embed_dim: int = 0  # ViT width (0: from the name)
    vit_depth: int = 0  # ViT blocks (0: from the name)
    vit_num_heads: int = 0  # ViT attention heads (0: from the name)
    proj_hidden: int | None = None  # head widths (SimCLR 2048-128, BYOL 4096-256, DINO 2048-256 bottleneck)
    proj_dim: int | None = None  # head output width (none: the method's recipe)
    temperature: float | None = None  # SimCLR 0.1, MoCo 0.2, DINO student 0.1
    sync_bn: bool | None = None  # SyncBatchNorm across processes (CUDA only)
    queue_size: int = 65536  # MoCo
    moco_momentum: float = 0.999  # MoCo: momentum of the key encoder's moving average
    shuffle_bn: bool = True  # MoCo: shuffle the keys across processes before BatchNorm (ShuffleBN)
    ema_start: float | None = None  # BYOL 0.99 / DINO 0.996, cosine to 1
    organ_probe: bool = True  # BYOL: linear organ classifier on detached features (PatchTCGA)
    dino_out_dim: int = 65536  # DINO: head output width (prototypes)
    norm_last_layer: bool = True  # DINO: weight-normalised last layer with its norm fixed to 1
    teacher_temp: float = 0.04  # DINO: teacher temperature after the warm-up
    warmup_teacher_temp: float = 0.04  # DINO: teacher temperature at the start
    warmup_teacher_temp_epochs: int = 0  # DINO: epochs of linear teacher-temperature warm-up
    center_momentum: float = 0.9  # DINO: momentum of the teacher output's centre
    freeze_last_layer: int = 1  # epochs
    drop_path: float = 0.1  # stochastic depth rate of a ViT student (DINO)
    weight_decay_end: float | None = None  # DINO: cosine 0.04 -> 0.4
    mask_ratio: float = 0.75  # MAE
    norm_pix_loss: bool = True  # MAE: loss on pixels normalised per patch
    decoder_dim: int = 512  # MAE decoder width
    decoder_depth: int = 8  # MAE decoder blocks
    decoder_heads: int = 16  # MAE decoder attention heads
    # views
    image_size: int = 224  # (global) crop size
    local_size: int = 96  # DINO local crops
    n_local: int = 8  # DINO local crops per image
    mean: list[float] | None = None  # RGB normalisation mean (none: the method's recipe)
    std: list[float] | None = None  # RGB normalisation std (none: the method's recipe)
    blur_scale: float = 1.0  # multiplies the recipes' blur sigmas (0.1-2 px are meant for 224-px crops)
    eval_crop: int = 287  # k-NN features: centre crop before resizing to image_size (PatchTCGA eval)
    # optimisation
    epochs: int = 40  # passes over the training images (the schedule's length)
    batch_size: int | None = None  # per process (none: the method's recipe)
    accum: int = 1  # gradient accumulation: micro-batches per update
    lr: float | None = None  # base lr at base_batch_size (none: the method's recipe)
    base_batch_size: int | None = None  # global batch at which the peak lr equals lr (none: the method's recipe)
    # (floor gives 0 below base_batch_size: refused)
    lr_scaling: Literal["linear", "floor"] = "linear"  # linear: lr * B / base | floor: PatchTCGA's lr * (B // base)
    optimizer: Literal["lars", "sgd", "adamw"] | None = None  # (none: the method's recipe)
    weight_decay: float | None = None  # (none: the method's recipe)
    warmup_epochs: float | None = None  # linear lr warm-up (none: the method's recipe)
    min_lr: float | None = None  # lr at the end of the cosine (none: the method's recipe)
    clip_norm: float | None = None  # 0: off; DINO clips each parameter's gradient norm to 3.0
    max_updates: int = 0  # stop after this many optimizer updates (0: all epochs)
    # monitoring
    knn_every: int = 1  # epochs between k-NN evaluations (0: only before and after training)
    knn_k: int = 20  # neighbours voting in the k-NN classifier
    knn_temperature: float = 0.07  # temperature of the k-NN vote weights exp(similarity / T)
    knn_bank_size: int = 20000  # labelled train images used as the k-NN memory bank
    knn_query_size: int = 5000  # held-out (val) images classified
    log_every: int = 10  # updates between progress and metrics lines
    checkpoint_every: int = 0  # also save last.pt every N updates
    channels_last: bool = True  # CUDA
    seed: int = 0
    num_workers: int = 4
    demo: bool = False  # synthetic PTCGA200-layout patches and small models (minutes on CPU)
    demo_per_class: int = 250  # synthetic demo images per organ (6 organs)

    @classmethod
    def demo_preset(cls) -> dict:
        return dict(data_root=str(Path(ssl_demo_root()) / "PTCGA200"), pack_dir=str(Path(ssl_demo_root()) / "packed"),
                    image_size=64, blur_scale=0.3, eval_crop=0, num_workers=2,
                    knn_bank_size=1200, knn_query_size=600, shard_size=500, log_every=5)

    def validate(self) -> None:
        defaults = dict(METHOD_DEFAULTS[self.method], **(DEMO_DEFAULTS[self.method] if self.demo else {}))
        for key, value in defaults.items():
            if getattr(self, key) is None or (self.demo and key in DEMO_DEFAULTS[self.method] and
                                              getattr(self, key) == getattr(type(self)(), key)):
                setattr(self, key, value)
        if self.weight_decay_end is None:
            self.weight_decay_end = self.weight_decay
        self.output_dir = self.output_dir or f"runs/pretrain_{self.method}{'_demo' if self.demo else ''}"
        if self.batch_size < 1 or self.accum < 1 or self.epochs < 1:
            raise ValueError("batch_size, accum and epochs must be positive")
        if self.method in ("simclr", "moco", "byol") and self.batch_size < 2:
            raise ValueError(f"{self.method} needs at least 2 images per process (BatchNorm, negatives)")
        if self.method == "mae" and not self.arch.startswith("vit_"):
            raise ValueError(f"{self.method} needs a timm ViT backbone (vit_*), got {self.arch!r}")
