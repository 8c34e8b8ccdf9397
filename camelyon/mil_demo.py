"""``camelyon/mil.py --demo``: synthetic slides -> tile features -> attention MIL, beside the map maximum.

The slides are the camelyon demo's generator (real formats: pyramidal TIFF at 0.243 µm/px, ASAP XML
lesions) with more, smaller slides: 12 tumour + 12 normal training slides and 6 + 6 test slides
(one test lesion an isolated-tumour-cell cluster of 400 px), built once under the cache folder,
with a Camelyon16-style ``testing/reference.csv``. Features come from a ResNet18 with random
weights fixed by the seed (no weights are downloaded; ``--backbone``-style choices are
``camelyon/features.py``'s). The max-probability baseline needs a trained patch model
(``--demo-checkpoint``, by default the one ``camelyon/train.py --demo`` leaves); when there is none
the baseline is left out and the command to make it is printed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from camelyon.config import FeatureConfig, InferConfig, MILConfig, mil_demo_root
from camelyon.demo import DemoLayout, make_demo
from common import dist
from common.io import atomic_write_text

DEMO_SLIDES = dict(n_train_tumor=12, n_train_normal=12, n_val_tumor=0, n_val_normal=0, n_test_tumor=6,
                   n_test_normal=6, size=(4096, 6144), n_coords_train=24, n_coords_val=0)


def demo_slides() -> DemoLayout:
    """The MIL demo's slides (generated once) and their reference.csv."""
    layout = make_demo(mil_demo_root(), **DEMO_SLIDES)
    reference = layout.root / "testing" / "reference.csv"
    if not reference.is_file():  # Camelyon16's layout: no header; name, Tumor|Normal, histotype, Macro|Micro|None
        rows = [f"{n},Tumor,IDC,Micro" if n in layout.test_tumor_slides else f"{n},Normal,None,None"
                for n in layout.test_slides]
        atomic_write_text(reference, "\n".join(rows) + "\n")
    return layout


def slide_folder(layout: DemoLayout, out: Path) -> Path:
    """One folder with every slide (symbolic links), as features.py and infer.py take one folder."""
    folder = out / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    for name in layout.train_slides + layout.test_slides:
        link = folder / f"{name}.tif"
        if not link.exists():
            link.symlink_to(layout.slide_path(name).resolve())
    return folder


def baseline_maps(layout: DemoLayout, cfg: MILConfig, out: Path) -> str:
    """infer.py over the test slides with the demo's patch model (finished slides are skipped on a
    re-run); '' when there is no such model."""
    from camelyon import infer

    if not Path(cfg.demo_checkpoint).is_file():
        dist.print0(f"max-probability baseline skipped: no {cfg.demo_checkpoint} "
                    "(train it with: python camelyon/train.py --demo)")
        return ""
    maps = out / "maps"
    infer.run(InferConfig(slides=str(layout.test_images), checkpoint=cfg.demo_checkpoint, output_dir=str(maps),
                          num_workers=2, device=cfg.device))
    return str(maps)


def prepare_mil_demo(cfg: MILConfig) -> MILConfig:
    """Slides, features and (with a patch model) baseline maps; returns the config pointing at them."""
    from camelyon import features

    out = Path(cfg.output_dir)
    layout = dist.run_on_main(demo_slides)
    layout = dist.broadcast_object(layout)
    slides = dist.run_on_main(slide_folder, layout, out)
    slides = dist.broadcast_object(slides)
    feats = out / "features"
    features.run(FeatureConfig(slides=str(slides), backbone="resnet18", output_dir=str(feats), seed=cfg.seed,
                               device=cfg.device, num_workers=2))
    maps = baseline_maps(layout, cfg, out) if "max-probability" in cfg.compare else ""
    compare = cfg.compare if maps else []
    return dataclasses.replace(cfg, features=str(feats), annotations=str(layout.train_annotations),
                               reference_csv=str(layout.root / "testing" / "reference.csv"), maps=maps,
                               compare=compare)
