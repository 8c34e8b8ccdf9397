"""Convert a released checkpoint to a plain backbone state_dict anyone can load.

    python pretrain/convert.py checkpoint_0199.pth.tar --out backbone.pt [--arch resnet50]

Detects SimCLR / MoCo / BYOL / DINO / MAE / project / torchvision / timm layouts
(``common.backbones``), prints the format, architecture and what was dropped, checks the result
strictly against the architecture and writes ``{key: tensor}`` (torchvision ResNet or timm ViT
keys, no head) atomically. Load it with ``model.load_state_dict(torch.load(out, weights_only=True),
strict=False)`` after checking that only ``fc.*`` / ``head.*`` are missing, or with
``common.backbones.load_backbone``.
"""
from __future__ import annotations

import sys

from common.backbones import import_backbone
from common.config import ArgumentParser
from common.errors import exit_on_user_error
from common.io import atomic_torch_save


def convert(checkpoint: str, out: str, arch: str | None = None):
    imported = import_backbone(checkpoint, arch)
    atomic_torch_save(imported.state_dict, out)
    return imported


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("checkpoint", help="released checkpoint (SimCLR, MoCo, BYOL, DINO, MAE, torchvision, timm, run)")
    parser.add_argument("--out", required=True, help="output .pt (plain backbone state_dict)")
    parser.add_argument("--arch", default=None, help="expected architecture (none: inferred from the weights)")
    args = parser.parse_args(argv)
    imported = convert(args.checkpoint, args.out, args.arch)
    print(imported.report())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
