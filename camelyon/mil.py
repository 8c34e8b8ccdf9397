"""Slide-level diagnosis with attention MIL on tile features (camelyon/features.py): train, evaluate, heatmaps.

    python camelyon/mil.py --features feats/uni --annotations C16/training/lesion_annotations \\
        --reference-csv C16/testing/reference.csv --model clam_sb --output-dir runs/mil_uni
    python camelyon/mil.py ... --compare max-probability --maps outputs/camelyon   # infer.py's maps beside it
    python camelyon/mil.py --demo                                                 # synthetic slides, end to end

Recipe (CLAM's README command, ../shared/reference/foundation-mil.md B2): one slide per step,
Adam lr 2e-4, weight decay 1e-5, dropout 0.25, class-balanced sampling, up to 200 epochs with
early stopping on the validation bag loss (20 epochs without improvement, not before epoch 50);
CLAM-SB with k = 8 and bag weight 0.7, smooth top-1 SVM instance loss; or gated ABMIL. k-fold
cross-validation (stratified) on the training slides; every fold's best model is evaluated on its
validation fold and on the official test set, and the folds' mean probability is the ensemble's.
AUC, balanced accuracy, sensitivity and specificity (threshold 0.5) come with stratified bootstrap
95 % confidence intervals; ``roc.png``, ``result.json``, ``metrics.jsonl`` and TensorBoard; attention
heatmaps over the thumbnails (``heatmaps/<slide>.png``) and the most attended tiles as QuPath
GeoJSON (``heatmaps/<slide>_top_tiles.geojson``). ``--compare max-probability`` scores each test slide
by the maximum of its ``infer.py`` map with the same code, in the same table.

DDP splits each epoch's bags across processes (one bag per process and step; gradients averaged);
a run killed at any point restarts from each fold's ``last.pt`` (epoch ends) and skips finished folds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from camelyon.annotations import write_geojson
from camelyon.config import MILConfig
from camelyon.mil_data import FeatureBags, Split, check_backbone_matches, make_split, slide_labels
from camelyon.mil_model import AttentionMIL, build_mil_model
from common import dist
from common.amp import MixedPrecision
from common.checkpoint import load_file
from common.config import parse_config
from common.errors import DataError, exit_on_user_error
from common.io import atomic_write, atomic_write_text
from common.logging import MetricLogger, progress, start_run
from common.metrics.classification import binary_metrics, bootstrap_ci, roc_curve
from common.training import Checkpointer, TrainState, wrap_ddp

METRICS = ("auc", "balanced_acc", "sensitivity", "specificity")
HEATMAP_SIDE = 600  # heatmaps are drawn at least this many pixels on their long side


# ============================================================================= training
def epoch_order(labels: np.ndarray, epoch: int, seed: int, weighted: bool) -> np.ndarray:
    """Positions into the training slides for one epoch, the same on every process: CLAM's
    ``WeightedRandomSampler`` (weight N / N_class, with replacement) or a permutation."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(labels)
    if not weighted:
        return torch.randperm(n, generator=g).numpy()
    counts = np.bincount(labels, minlength=2)
    weights = torch.as_tensor(n / counts[labels], dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=g).numpy()


def my_share(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's bags: ``order`` padded (wrapping) to a multiple of ``world``, every world-th."""
    if world > 1 and len(order) % world:
        order = np.concatenate([order, order[:world - len(order) % world]])
    return order[rank::world]


def training_bag(bags: FeatureBags, i: int, max_tiles: int, seed: int, epoch: int) -> torch.Tensor:
    """A slide's bag, or a random subset of ``max_tiles`` of its tiles fixed by (seed, epoch, slide)."""
    x = bags.bag(i)
    if max_tiles and len(x) > max_tiles:
        g = torch.Generator().manual_seed(seed * 7_919 + epoch * 104_729 + i)
        x = x[torch.randperm(len(x), generator=g)[:max_tiles].sort().values]
    return x


def train_one_epoch(model, bags: FeatureBags, labels: np.ndarray, train_idx: np.ndarray, optimizer,
                    amp: MixedPrecision, state: TrainState, ctx, cfg: MILConfig, logger: MetricLogger, epoch: int) -> float:
    """One pass over this process's share of the epoch's bags; returns the mean training loss."""
    model.train()
    order = train_idx[my_share(epoch_order(labels[train_idx], epoch, cfg.seed, cfg.weighted_sample),
                               ctx.rank, ctx.world_size)]
    total = 0.0
    for i in order:
        x = training_bag(bags, int(i), cfg.max_train_tiles, cfg.seed, epoch).to(ctx.device, non_blocking=True)
        with amp.autocast():
            out = model(x, torch.tensor(int(labels[i]), device=ctx.device))
        amp.backward_step(out["loss"], optimizer)
        state.step += 1
        total += float(out["loss"].detach())
    mean = dist.reduce_sums({"loss": total, "n": len(order)}, ctx.device)
    loss = mean["loss"] / max(mean["n"], 1)
    logger.log(state.step, {"loss": loss}, prefix="train", epoch=epoch)
    return loss


@torch.no_grad()
def predict(model: AttentionMIL, bags: FeatureBags, idx: np.ndarray, labels: np.ndarray, ctx,
            amp: MixedPrecision) -> dict[str, np.ndarray]:
    """Tumour probability and bag loss of each slide in ``idx`` (shared across processes, gathered)."""
    model.eval()
    mine = {}
    for i in my_share(np.asarray(idx), ctx.rank, ctx.world_size):
        with amp.autocast():
            out = model(bags.bag(int(i)).to(ctx.device), torch.tensor(int(labels[i]), device=ctx.device))
        mine[int(i)] = (float(torch.softmax(out["logits"].float(), 0)[1]), float(out["bag_loss"]))
    found = {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}
    return {"prob": np.array([found[int(i)][0] for i in idx]), "bag_loss": np.array([found[int(i)][1] for i in idx])}


def early_stop(state: TrainState, val_loss: float, epoch: int, cfg: MILConfig) -> tuple[bool, bool]:
    """CLAM's ``EarlyStopping``: (improved, stop). Stops after ``patience`` epochs without a lower
    validation bag loss, once past ``stop_epoch``."""
    extra = state.extra
    improved = val_loss < extra["best_val_loss"]
    if improved:
        extra["best_val_loss"], extra["bad_epochs"] = val_loss, 0
        state.best = -val_loss
    else:
        extra["bad_epochs"] += 1
    return improved, extra["bad_epochs"] >= cfg.patience and epoch + 1 > cfg.stop_epoch


def train_fold(fold: int, bags: FeatureBags, labels: np.ndarray, split: Split, cfg: MILConfig, ctx) -> AttentionMIL:
    """Train one fold (resuming from its ``last.pt``); returns the model with its best weights."""
    out = Path(cfg.output_dir) / f"fold{fold}"
    train_idx, val_idx = split.fold(fold)
    torch.manual_seed(cfg.seed + fold)
    model = make_model(cfg, bags).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = MixedPrecision(ctx.device, cfg.precision)
    state = TrainState(best=-math.inf, extra={"best_val_loss": math.inf, "bad_epochs": 0, "stopped": False})
    ckpt = Checkpointer(out, ctx, cfg, model=model, optimizer=optimizer, amp=amp,
                        extra={"fold": fold, "backbone": bags.backbone, "slides": bags.names})
    if (out / "last.pt").is_file():  # a run continued on features of another backbone stops here
        check_backbone_matches(load_file(out / "last.pt").get("backbone", {}), bags.backbone, str(out / "last.pt"))
    ckpt.resume(state)
    ddp = wrap_ddp(model, ctx, find_unused_parameters=cfg.model == "clam_sb")
    logger = MetricLogger(out)
    bar = progress(range(state.epoch, cfg.epochs), desc=f"fold {fold}", total=cfg.epochs, initial=state.epoch)
    for epoch in bar:
        if state.extra["stopped"]:
            break
        loss = train_one_epoch(ddp, bags, labels, train_idx, optimizer, amp, state, ctx, cfg, logger, epoch)
        val = predict(model, bags, val_idx, labels, ctx, amp)
        val_loss = float(val["bag_loss"].mean())
        logger.log(state.step, {"loss": val_loss, "auc": binary_metrics(labels[val_idx], val["prob"])["auc"]},
                   prefix="val", epoch=epoch)
        improved, state.extra["stopped"] = early_stop(state, val_loss, epoch, cfg)
        state.epoch = epoch + 1
        if improved:
            ckpt.save(state, "best.pt")
        ckpt.save(state, "last.pt")
        bar.set_postfix(train=f"{loss:.3f}", val=f"{val_loss:.3f}")
    logger.close()
    load_mil_weights(model, out / "best.pt", bags.backbone)
    return model


def make_model(cfg: MILConfig, bags: FeatureBags) -> AttentionMIL:
    return build_mil_model(cfg.model, bags.backbone["embed_dim"], cfg.hidden, cfg.dropout, cfg.k_sample,
                           cfg.bag_weight, cfg.inst_loss)


def load_mil_weights(model: AttentionMIL, path: Path, backbone: dict) -> None:
    """Strictly load a MIL checkpoint trained on features of ``backbone`` (else a clear error)."""
    saved = load_file(path)
    check_backbone_matches(saved.get("backbone", {}), backbone, str(path))
    model.load_state_dict(saved["model"], strict=True)


# ============================================================================= evaluation
def summarise(labels: np.ndarray, probs: np.ndarray, cfg: MILConfig) -> dict:
    """binary_metrics with bootstrap 95 % CIs: ``{metric: value, metric_ci: [low, high], n, positives}``."""
    m = binary_metrics(labels, probs)
    ci = bootstrap_ci(labels, probs, cfg.bootstrap, cfg.seed)
    return {**m, **{f"{k}_ci": list(ci[k]) for k in METRICS}}


def max_probability_scores(maps: str, names: list[str]) -> np.ndarray:
    """Each slide's score as ``infer.py`` gives it: the maximum of its probability map ``<slide>.npy``."""
    scores = []
    for name in names:
        found = [p for p in Path(maps).glob("*.npy") if p.stem.lower() == name]
        if not found:
            raise DataError(f"--maps {maps}: no {name}.npy (run camelyon/infer.py over the test slides)")
        scores.append(float(np.load(found[0], allow_pickle=False).max()))
    return np.asarray(scores)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {binary_metrics(labels, scores)['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="slide-level ROC (test)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


@torch.no_grad()
def mean_attention(models: list[AttentionMIL], bag: torch.Tensor) -> np.ndarray:
    """The folds' attention over one bag, averaged: (N,)."""
    return np.mean([m.eval()(bag)["attention"].float().cpu().numpy() for m in models], axis=0)


def attention_outputs(models: list[AttentionMIL], bags: FeatureBags, i: int, out: Path, top: int, device) -> None:
    """``<slide>.png``: attention (per-slide rank, 0..1) over the thumbnail; ``<slide>_top_tiles.geojson``:
    the ``top`` most attended tiles as QuPath annotations with their attention as a measurement."""
    from PIL import Image

    att = mean_attention(models, bags.bag(i).to(device))
    coords, attrs, name = bags.coords(i), bags.attrs[i], bags.names[i]
    side = float(attrs["tile_size_level0"])
    order = np.argsort(-att)[:top]
    squares = [np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]]) for x, y in coords[order]]
    write_geojson(out / f"{name}_top_tiles.geojson", polygons=squares, classification="Attention",
                  measurements=[{"attention": float(att[k]), "rank": r + 1} for r, k in enumerate(order)])
    thumb = bags.thumbnail(i)
    if thumb is None:
        return
    zoom = max(1, HEATMAP_SIDE // max(thumb.shape[:2]))  # thumbnails are ~1/100 of level 0: enlarge small ones
    thumb = np.asarray(Image.fromarray(thumb).resize((thumb.shape[1] * zoom, thumb.shape[0] * zoom), Image.BILINEAR))
    ratio = float(attrs["thumbnail_ratio"]) / zoom  # level-0 px per heatmap px
    rank = np.empty(len(att))
    rank[np.argsort(att)] = np.linspace(0, 1, len(att))  # attention as its rank within the slide, 0..1
    heat = np.full(thumb.shape[:2], np.nan)
    for (x, y), v in zip(coords, rank):
        heat[int(y / ratio):int((y + side) / ratio), int(x / ratio):int((x + side) / ratio)] = v
    from matplotlib import colormaps
    colour = colormaps["jet"](np.nan_to_num(heat))[..., :3] * 255
    blend = np.where(np.isnan(heat)[..., None], thumb, 0.5 * thumb + 0.5 * colour).astype(np.uint8)
    image = Image.fromarray(np.concatenate([thumb, blend], axis=1))
    atomic_write(out / f"{name}.png", lambda fh: image.save(fh, format="PNG"))


def evaluate_folds(models: list[AttentionMIL], bags: FeatureBags, labels: np.ndarray, split: Split, cfg: MILConfig,
                   ctx) -> dict:
    """Each fold's validation and test metrics, the ensemble's test metrics, the baselines'."""
    amp = MixedPrecision(ctx.device, cfg.precision)
    result: dict = {"folds": [], "backbone": bags.backbone, "slides": len(bags), "test_slides": len(split.test)}
    test_probs = []
    for fold, model in enumerate(models):
        _, val_idx = split.fold(fold)
        entry = {"fold": fold, "val": summarise(labels[val_idx], predict(model, bags, val_idx, labels, ctx, amp)["prob"], cfg)}
        if len(split.test):
            probs = predict(model, bags, split.test, labels, ctx, amp)["prob"]
            test_probs.append(probs)
            entry["test"] = summarise(labels[split.test], probs, cfg)
        result["folds"].append(entry)
    if len(split.test):
        y = labels[split.test]
        result["ensemble_test"] = summarise(y, np.mean(test_probs, axis=0), cfg)
        result["test_predictions"] = {bags.names[i]: float(p) for i, p in zip(split.test, np.mean(test_probs, axis=0))}
        if "max-probability" in cfg.compare:
            scores = max_probability_scores(cfg.maps, [bags.names[i] for i in split.test])
            result["max_probability_test"] = summarise(y, scores, cfg)
            result["_curves_baseline"] = scores
        result["_curves_ensemble"] = np.mean(test_probs, axis=0)
    return result


def table(result: dict) -> str:
    """The results as a Markdown table: value [95 % CI] per metric."""
    def cells(m: dict) -> str:
        return " | ".join(f"{m[k]:.3f} [{m[k + '_ci'][0]:.2f}, {m[k + '_ci'][1]:.2f}]" for k in METRICS)
    rows = ["| model | slides | AUC | balanced acc | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for f in result["folds"]:
        rows.append(f"| fold {f['fold']} (val) | {f['val']['n']} | {cells(f['val'])} |")
    for f in result["folds"]:
        if "test" in f:
            rows.append(f"| fold {f['fold']} (test) | {f['test']['n']} | {cells(f['test'])} |")
    for key, name in (("ensemble_test", "MIL, folds averaged (test)"), ("max_probability_test", "max probability (test)")):
        if key in result:
            rows.append(f"| {name} | {result[key]['n']} | {cells(result[key])} |")
    return "\n".join(rows)


def report(result: dict, labels: np.ndarray, split: Split, out: Path, logger: MetricLogger) -> None:
    """``result.json``, ``roc.png``, the table (printed and ``results.md``) and the test metrics logged."""
    curves = {}
    if "_curves_ensemble" in result:
        curves["MIL (folds averaged)"] = (labels[split.test], result.pop("_curves_ensemble"))
    if "_curves_baseline" in result:
        curves["max probability"] = (labels[split.test], result.pop("_curves_baseline"))
    if curves:
        roc_plot(curves, out / "roc.png")
    for key in ("ensemble_test", "max_probability_test"):
        if key in result:
            logger.log(0, {k: result[key][k] for k in METRICS}, prefix=key)
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "results.md", table(result) + "\n")
    print(table(result), flush=True)


# ============================================================================= main
def run(cfg: MILConfig) -> dict:
    ctx = dist.setup(cfg.device)
    if cfg.demo:
        from camelyon.mil_demo import prepare_mil_demo
        cfg = prepare_mil_demo(cfg)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    out = start_run(cfg, "camelyon MIL", ctx)
    bags = FeatureBags(cfg.features)
    label_of = slide_labels(bags.names, cfg.labels, cfg.reference_csv, cfg.annotations)
    labels = np.array([label_of[n] for n in bags.names])
    split = make_split(bags.names, labels, cfg.split, cfg.folds, cfg.seed)
    if "max-probability" in cfg.compare and not cfg.maps:
        raise DataError("--compare max-probability: needs --maps (the output folder of camelyon/infer.py)")
    dist.print0(f"{len(bags)} slides ({int(labels.sum())} tumour), {bags.backbone['backbone']} "
                f"{bags.backbone['embed_dim']}-d features; {len(split.pool)} for {cfg.folds}-fold CV, "
                f"{len(split.test)} test; {cfg.model}")
    models = [train_fold(k, bags, labels, split, cfg, ctx) for k in range(cfg.folds)]
    result = evaluate_folds(models, bags, labels, split, cfg, ctx)
    if ctx.is_main:
        report(result, labels, split, out, MetricLogger(out))
        heat = out / "heatmaps"
        heat.mkdir(exist_ok=True)
        shown = sorted(split.test, key=lambda i: (-labels[i], bags.names[i]))[:cfg.heatmaps] if len(split.test) else []
        for i in shown:
            attention_outputs(models, bags, int(i), heat, cfg.top_tiles, ctx.device)
    return result


def main(cfg: MILConfig) -> None:
    run(cfg)
    dist.cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(MILConfig))
