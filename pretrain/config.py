"""Configuration of PCam200 / PTCGA200 fine-tuning. Defaults are PatchTCGA's committed PCam200
recipe (see ../shared/reference/pretrain-segpanda.md §1, §9); every field is a ``--flag``."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import BaseConfig, default_cache_dir

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def demo_root() -> str:
    return str(default_cache_dir("pretrain_demo") / "PCam200")


@dataclass
class FinetuneConfig(BaseConfig):
    """Fine-tune (or linear-probe) a backbone on PCam200 / PTCGA200 classification."""

    output_dir: str = "runs/pcam200_finetune"
    dataset: str = "pcam200"  # pcam200 (root/{train,val,test}/{normal,tumor}/<case>/<img>) | pcam_h5 | ptcga200
    data_root: str = "./datasets/PCam200"  # folder (pcam200, ptcga200) or folder of PCam {split}_{x,y}.h5
    split_file: str = ""  # ptcga200: 3fold_dict_idx_filenames.pickle (default <data_root>/..)
    fold: str = "0"
    # model
    arch: str = "resnet50"  # torchvision resnet* | timm vit_* name
    backbone: str = ""  # checkpoint of any format common.backbones imports (SimCLR, MoCo, BYOL, DINO, MAE, ...)
    dropout: float = 0.4  # Dropout before the final Linear
    linear_probe: bool = False  # frozen backbone (BN in eval mode), train only the head
    # recipe
    epochs: int = 5
    max_updates: int = 1000  # PatchTCGA stops after 1000 updates (0: no cap)
    batch_size: int = 128  # per process
    base_batch_size: int = 512  # peak lr = lr * global batch / base_batch_size (real division)
    lr: float = 1e-4
    weight_decay: float = 5e-5  # not on biases and norm parameters
    warmup_epochs: float = 1.0
    clip_norm: float = 1.0
    image_size: int = 224
    eval_crop: int = 287  # centre crop before resizing to image_size (0: resize the whole patch)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # RandomResizedCrop area range
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # colour jitter, p 0.8
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur, p 0.5
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    seed: int = 1234
    num_workers: int = 4
    # engineering
    eval_every: int = 200  # validate every N updates (and at each epoch end)
    channels_last: bool = True  # used on CUDA
    log_every: int = 10
    checkpoint_every: int = 0  # also save last.pt every N updates
    max_eval_samples: int = 0  # 0: the whole split
    demo: bool = False

    @classmethod
    def demo_preset(cls) -> dict:
        return dict(data_root=demo_root(), output_dir="runs/pcam200_demo", arch="resnet18", epochs=2,
                    max_updates=0, batch_size=32, base_batch_size=32, lr=1e-3, weight_decay=0.0,
                    warmup_epochs=0.3, image_size=64, eval_crop=72, blur_sigma=[0.1, 1.0], num_workers=2,
                    eval_every=0, seed=0)

    def validate(self) -> None:
        if self.dataset not in ("pcam200", "pcam_h5", "ptcga200"):
            raise ValueError(f"--dataset must be pcam200, pcam_h5 or ptcga200, got {self.dataset!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be positive")
        if len(self.crop_scale) != 2 or len(self.jitter) != 4 or len(self.blur_sigma) != 2:
            raise ValueError("crop_scale needs 2 values, jitter 4, blur_sigma 2")

    @property
    def num_classes(self) -> int:
        return 20 if self.dataset == "ptcga200" else 2


@dataclass
class EvalConfig(BaseConfig):
    """Evaluate a fine-tuned checkpoint on one split: metrics JSON + ROC curve PNG."""

    checkpoint: str = ""  # best.pt / last.pt of a fine-tuning run (its config gives arch and data)
    split: str = "test"
    data_root: str = ""  # default: the run's data_root
    output_dir: str = ""  # default: <checkpoint folder>/eval_<split>
    batch_size: int = 64
    num_workers: int = 2
