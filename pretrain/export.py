"""Export the backbone of a pretraining run as a plain state_dict.

    python pretrain/export.py runs/pretrain_simclr --out simclr_resnet50.pt
    python pretrain/export.py runs/pretrain_byol/last.pt --out byol_target.pt --prefix target_backbone.

The file holds torchvision (ResNet) or timm (ViT) key names only — no head, no wrapper — and is
checked strictly against the architecture inferred from its shapes before it is written
(atomically). ``pretrain/finetune.py --backbone`` and ``segpanda/train.py --pretrained`` load it
strictly; so does ``torchvision.models.resnet50()`` / ``timm.create_model(name)`` apart from the
classifier. The exported part is what each method releases: SimCLR's encoder, MoCo's query
encoder, BYOL's online encoder, DINO's teacher, MAE's encoder (``--prefix`` picks another,
e.g. ``target_backbone.`` for BYOL's target or ``student.`` for DINO's student).
"""
from __future__ import annotations

from pathlib import Path

from common.backbones import import_backbone
from common.checkpoint import CheckpointError, load_file
from common.config import ArgumentParser
from common.errors import exit_on_user_error
from common.io import atomic_torch_save


def export_backbone(source: str | Path, out: str | Path, prefix: str = "") -> dict:
    """Write the run's backbone to ``out``; returns ``{"arch", "build_kwargs", "tensors", "report"}``."""
    path = Path(source)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (pass a run folder with last.pt, or a .pt file)")
    obj = load_file(path)
    if prefix:
        if not isinstance(obj, dict) or "model" not in obj:
            raise CheckpointError(f"{path}: --prefix needs a pretrain/train.py checkpoint")
        if not any(k.startswith(prefix) for k in obj["model"]):
            raise CheckpointError(f"{path}: no keys start with {prefix!r} "
                                  f"(top-level modules: {sorted({k.split('.')[0] for k in obj['model']})})")
        obj = dict(obj, backbone_prefix=prefix)
    imported = import_backbone(obj)
    atomic_torch_save(imported.state_dict, out)
    return {"arch": imported.arch, "build_kwargs": imported.build_kwargs, "tensors": len(imported.state_dict),
            "report": imported.report()}


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="run folder (uses last.pt) or checkpoint file")
    parser.add_argument("--out", required=True, help="output .pt (plain backbone state_dict)")
    parser.add_argument("--prefix", default="", help="export another sub-network, e.g. target_backbone.")
    args = parser.parse_args(argv)
    info = export_backbone(args.source, args.out, args.prefix)
    print(info["report"])
    print(f"wrote {args.out}: {info['tensors']} tensors for {info['arch']}"
          f"{' ' + str(info['build_kwargs']) if info['build_kwargs'] else ''}")
    return info


if __name__ == "__main__":
    with exit_on_user_error():
        main()
