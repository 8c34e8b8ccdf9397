"""Benchmarks of the slide-level path: tile-feature throughput per backbone, MIL training on a large bag.

    python camelyon/bench_mil.py                       # the default backbones, a 50,000-tile bag
    python camelyon/bench_mil.py --backbones resnet18 uni --bag 50000 --dims 1024 1536

Each measurement runs in a fresh process (so peak RSS is its own) on this machine's CPU, fp32:

- ``forward``: tiles/s of each backbone's forward pass on preprocessed 224-px batches (random
  weights in the published architecture: the foundation models are built from
  ``common/foundation.py``'s specs without a weights file), after a warm-up batch;
- ``features.py``: tiles/s of the whole extraction (tissue grid, reading, resampling, ResNet18,
  HDF5 writing) over a few cached demo slides, start-up included;
- ``MIL``: seconds per CLAM-SB training step (forward, instance loss, backward, Adam) and the peak
  RSS above the loaded bag, for a bag of ``--bag`` tiles of each width in ``--dims``.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch

from common.config import ArgumentParser
from common.errors import exit_on_user_error

DEFAULT_BACKBONES = ("resnet18", "resnet50-trunc", "kaiko-vits16", "phikon", "uni", "virchow2", "h-optimus-0")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_encoder(name: str):
    """(model, batch size) of a backbone with random weights: features.py's ResNets, or a foundation
    model's published architecture and pooling."""
    from camelyon.features import build_encoder
    from common.foundation import FOUNDATION_MODELS, TileEmbedder

    if name not in FOUNDATION_MODELS:
        return build_encoder(name).model, 32
    import timm
    spec = FOUNDATION_MODELS[name]
    trunk = timm.create_model(spec.timm_name, pretrained=False, **spec.build_kwargs()).eval()
    params = sum(p.numel() for p in trunk.parameters())
    batch = 16 if params < 100e6 else 8 if params < 400e6 else 2  # ViT-S/B | ViT-L | ViT-H/g
    return TileEmbedder(trunk, spec.pooling).eval(), batch


def forward_rate(name: str, min_seconds: float = 15.0) -> dict:
    """Tiles/s of one backbone's forward pass (no grad, fp32) on random 224-px batches."""
    torch.manual_seed(0)
    model, batch = _random_encoder(name)
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        model(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds or n < 2 * batch:
            dim = model(x).shape[1]
            n += batch
    seconds = time.perf_counter() - t0
    return {"backbone": name, "tiles_per_s": n / seconds, "batch": batch, "embed_dim": int(dim),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def extraction_rate(slides: list[str]) -> dict:
    """Tiles/s of features.py's whole run over ``slides`` (ResNet18, random weights, 2 readers)."""
    import os

    from camelyon.config import FeatureConfig
    from camelyon.features import run

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        for s in slides:
            os.symlink(Path(s).resolve(), folder / Path(s).name)
        t0 = time.perf_counter()
        summaries = run(FeatureConfig(slides=str(folder), backbone="resnet18", output_dir=f"{tmp}/out",
                                      device="cpu", num_workers=2))
        seconds = time.perf_counter() - t0
    tiles = sum(s.get("tiles", 0) for s in summaries)
    return {"slides": len(slides), "tiles": tiles, "seconds": seconds, "tiles_per_s": tiles / seconds}


def mil_step(n_tiles: int, dim: int, steps: int = 3) -> dict:
    """Seconds per CLAM-SB training step and peak RSS above the loaded bag, for an (n_tiles, dim) bag."""
    from camelyon.mil_model import build_mil_model

    torch.manual_seed(0)
    model = build_mil_model("clam_sb", dim)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
    bag = torch.randn(n_tiles, dim)
    base = _rss_mb()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(bag, torch.tensor(1))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"tiles": n_tiles, "dim": dim, "seconds_per_step": min(times), "bag_mb": bag.numel() * 4 / 2**20,
            "peak_above_bag_mb": _rss_mb() - base}


def _child(fn, args, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    queue.put(fn(*args))


def fresh(fn, *args) -> dict:
    """``fn(*args)`` in a fresh (spawned) process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def demo_slides(n: int) -> list[str]:
    from camelyon.config import mil_demo_root, demo_root

    for root in (Path(mil_demo_root()) / "testing" / "images", Path(demo_root()) / "testing" / "images"):
        found = sorted(str(p) for p in root.glob("*.tif"))
        if found:
            return found[:n]
    return []


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES), help="backbones for the forward rate")
    ap.add_argument("--seconds", type=float, default=15.0, help="minimum timed seconds per backbone")
    ap.add_argument("--bag", type=int, default=50_000, help="tiles in the MIL bag")
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 1536], help="feature widths of the MIL bag")
    ap.add_argument("--slides", type=int, default=4, help="cached demo slides for the features.py run (0: skip)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    print("| backbone | params (M) | embedding | batch | forward tiles/s |\n|---|---|---|---|---|")
    for name in args.backbones:
        r = fresh(forward_rate, name, args.seconds)
        print(f"| {name} | {r['params_m']:.1f} | {r['embed_dim']} | {r['batch']} | {r['tiles_per_s']:.2f} |", flush=True)
    slides = demo_slides(args.slides) if args.slides else []
    if slides:
        r = fresh(extraction_rate, slides)
        print(f"\nfeatures.py, ResNet18, {r['slides']} demo slides, whole run: {r['tiles']} tiles in "
              f"{r['seconds']:.1f} s = {r['tiles_per_s']:.1f} tiles/s", flush=True)
    print("\n| MIL bag | width | s per CLAM-SB step | bag (MB) | peak RSS above the bag (MB) |\n|---|---|---|---|---|")
    for dim in args.dims:
        r = fresh(mil_step, args.bag, dim)
        print(f"| {r['tiles']:,} tiles | {dim} | {r['seconds_per_step']:.3f} | {r['bag_mb']:.0f} | "
              f"{r['peak_above_bag_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    with exit_on_user_error():
        main()
