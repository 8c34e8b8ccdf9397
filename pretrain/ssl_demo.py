"""Generate the synthetic SSL set (:func:`pretrain.synthetic.make_ssl_demo`) and look at it.

    python pretrain/ssl_demo.py --root /tmp/ssl_demo [--per-class 250] [--size 96] [--seed 0] [--montage m.png]

Prints the images per organ and split; ``--montage`` saves one row of examples per organ.
``train.py --demo`` builds the same set itself, into the cache folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.config import ArgumentParser
from common.errors import exit_on_user_error
from pretrain.dataset import ORGAN2ID, load_split_file
from pretrain.synthetic import PAINTERS, SPLIT_FILE, make_ssl_demo


def save_montage(root: Path, path: Path, per_class: int = 10) -> Path:
    """One row of the first ``per_class`` images of every organ, saved as a PNG at ``path``."""
    rows = []
    for organ in PAINTERS:
        files = sorted((Path(root) / "PTCGA200" / organ).glob(f"{organ}_*.png"), key=lambda p: int(p.stem.split("_")[-1]))
        if not files:
            raise FileNotFoundError(f"{Path(root) / 'PTCGA200' / organ}: no images; run make_ssl_demo first")
        rows.append(np.concatenate([np.asarray(Image.open(f).convert("RGB")) for f in files[:per_class]], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description="Generate the synthetic SSL demo set (PTCGA200 layout).")
    parser.add_argument("--root", required=True, help="output folder (gets PTCGA200/ and the split pickle)")
    parser.add_argument("--per-class", type=int, default=250, help="images per organ class")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic images")
    parser.add_argument("--montage", default="", help="also save a PNG with one row of examples per organ")
    args = parser.parse_args(argv)
    root = make_ssl_demo(Path(args.root), args.per_class, args.size, args.seed).root
    split = load_split_file(root / SPLIT_FILE)["0"]
    for organ in PAINTERS:
        counts = {part: sum(n.startswith(f"{organ}_") for n in split[part]["imgs"]) for part in split}
        print(f"{organ:10s} (label {ORGAN2ID[organ]:2d}): " + "  ".join(f"{p} {c}" for p, c in counts.items()))
    print(f"total {sum(len(v['imgs']) for v in split.values())} images under {root / 'PTCGA200'}")
    if args.montage:
        print(f"montage -> {save_montage(root, Path(args.montage))}")
    return root


if __name__ == "__main__":
    with exit_on_user_error():
        main()
