"""Demo data in the real on-disk layouts, and the "imported backbone beats random init" demo.

    python pretrain/finetune.py --demo      # fine-tune ResNet18 from random init on PCam-like patches
    python pretrain/demo.py                 # organ pretraining -> backbone import -> linear probes

Synthetic PCam-like patches in the real PCam200 folder layout, generated once.

``root/{train,val,test}/{normal,tumor}/<case>/<case>_<i>.png``: pink stroma with purple nuclei;
"tumor" patches have more, larger, darker and more irregular nuclei than "normal" ones, with
overlapping distributions so the task is learnable but not trivial. A ``.complete`` marker is
written last; an interrupted generation is redone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from common.io import atomic_write_text

SPLITS = {"train": 12, "val": 4, "test": 4}  # cases per class; 40 patches per case
PER_CASE = 40
SIZE = 96
MARKER = ".complete"


def ellipse_mask(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, semi_u: float, semi_v: float,
                 theta: float) -> np.ndarray:
    """Pixels inside the ellipse centred at (cy, cx) with semi-axes ``semi_u`` along the direction
    ``theta`` and ``semi_v`` across it; ``yy, xx`` from ``np.mgrid``."""
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / semi_u) ** 2 + (v / semi_v) ** 2 <= 1


def synth_patch(rng: np.random.Generator, tumor: bool, size: int = SIZE) -> np.ndarray:
    """uint8 (size, size, 3) H&E-like patch."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.array([226, 160, 196], np.float32) + rng.normal(0, 8, 3)
    img = base + rng.normal(0, 10, (size, size, 1)) * np.array([1.0, 1.2, 0.8], np.float32)
    n = rng.integers(14, 34) if tumor else rng.integers(6, 22)
    for _ in range(n):
        r = rng.uniform(3.5, 7.5) if tumor else rng.uniform(2.5, 5.0)
        ax = r * rng.uniform(0.7, 1.4 if tumor else 1.1)
        cy, cx, th = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
        inside = ellipse_mask(yy, xx, cy, cx, ax, r, th)
        colour = np.array([70, 40, 130] if tumor else [95, 60, 150], np.float32) + rng.normal(0, 12, 3)
        img[inside] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pcam_like(root: Path, seed: int = 0, splits: dict | None = None) -> Path:
    """Generate the demo set into ``root`` unless it is already complete; returns ``root``."""
    root = Path(root)
    if (root / MARKER).is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    for split, cases in (splits or SPLITS).items():
        for label, name in enumerate(("normal", "tumor")):
            for c in range(cases):
                case = root / split / name / f"{split}_{name}_{c:03d}"
                case.mkdir(parents=True, exist_ok=True)
                for i in range(PER_CASE):
                    Image.fromarray(synth_patch(rng, bool(label))).save(case / f"{case.name}_{i:03d}.png")
    atomic_write_text(root / MARKER, json.dumps({"splits": SPLITS, "per_case": PER_CASE, "size": SIZE}) + "\n")
    return root


# ============================================================================= organ pretraining data
# (stroma RGB, nucleus radius range, count range, elongation): four "organs" that differ in the
# nuclear features the tumour task also needs, in PTCGA200's layout and with its split pickle.
ORGANS = {"liver": ((225, 150, 170), (4.0, 6.5), (10, 25), 1.1), "lung": ((235, 190, 215), (2.5, 4.0), (4, 14), 1.0),
          "skin": ((220, 165, 205), (2.0, 3.5), (20, 40), 2.2), "thyroid": ((215, 140, 190), (5.0, 8.0), (3, 10), 1.3)}


def organ_patch(rng: np.random.Generator, organ: str, size: int = SIZE) -> np.ndarray:
    stroma, (r0, r1), (n0, n1), elong = ORGANS[organ]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.array(stroma, np.float32) + rng.normal(0, 8, 3) + rng.normal(0, 10, (size, size, 1))
    for _ in range(rng.integers(n0, n1)):
        r = rng.uniform(r0, r1)
        cy, cx, th = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
        img[ellipse_mask(yy, xx, cy, cx, r * elong, r, th)] = np.array([80, 50, 140], np.float32) + rng.normal(0, 15, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_organ_like(root: Path, per_organ: int = 200, seed: int = 1) -> Path:
    """``root/<organ>/<organ>_<i>.png`` + ``root/../3fold_dict_idx_filenames.pickle`` (fold 0:
    70 % train, 15 % val, 15 % test by basename), generated once."""
    import pickle
    root = Path(root)
    if (root / MARKER).is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    split: dict = {s: {"idx": [], "imgs": []} for s in ("train", "val", "test")}
    for organ in ORGANS:
        (root / organ).mkdir(parents=True)
        for i in range(per_organ):
            name = f"{organ}_{i:04d}.png"
            Image.fromarray(organ_patch(rng, organ)).save(root / organ / name)
            part = "train" if i < 0.7 * per_organ else "val" if i < 0.85 * per_organ else "test"
            split[part]["imgs"].append(name)
    (root.parent / "3fold_dict_idx_filenames.pickle").write_bytes(pickle.dumps({"0": split}))
    atomic_write_text(root / MARKER, json.dumps({"organs": list(ORGANS), "per_organ": per_organ}) + "\n")
    return root


# ============================================================================= backbone comparison
def main(argv: list[str] | None = None) -> dict:
    """Supervised organ pretraining (ResNet18, PTCGA200 layout) -> its best.pt imported as a
    backbone (project format) -> linear probes on PCam-like patches: imported vs random init."""
    import argparse
    from common.config import default_cache_dir, parse_config
    from pretrain.config import FinetuneConfig
    from pretrain.finetune import main as finetune

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/pretrain_demo")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    out, cache = Path(args.output_dir), default_cache_dir("pretrain_demo")
    common = ["--demo", "--device", args.device, "--resume", "false"]
    organ = make_organ_like(cache / "PTCGA200")
    finetune(parse_config(FinetuneConfig, common + [
        "--dataset", "ptcga200", "--data-root", str(organ), "--output-dir", str(out / "organ_pretrain"), "--epochs", "2"]))
    probe = common + ["--linear-probe", "true", "--epochs", "1", "--lr", "3e-3"]
    results = {name: finetune(parse_config(FinetuneConfig, probe + ["--output-dir", str(out / f"probe_{name}")] + extra))
               for name, extra in (("random", []), ("imported", ["--backbone", str(out / "organ_pretrain" / "best.pt")]))}
    for name, r in results.items():
        print(f"linear probe, {name:8s} backbone: test acc {r['test']['acc']:.4f}  auc {r['test']['auc']:.4f}")
    return results


if __name__ == "__main__":
    main()
