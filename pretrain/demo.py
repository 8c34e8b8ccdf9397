"""The "imported backbone beats random init" demo: it only drives the other scripts.

    python pretrain/demo.py                 # organ pretraining -> backbone import -> linear probes

The data are the synthetic sets of :mod:`pretrain.synthetic`, generated once into the cache folder
(``$PATHMONO_CACHE`` or ``~/.cache/pathmono``); ``finetune.py --demo`` and ``train.py --demo``
use the same sets.
"""
from __future__ import annotations

from pathlib import Path

from common.config import ArgumentParser, default_cache_dir, field_choices, field_comments, parse_config
from common.errors import exit_on_user_error
from pretrain.config import FinetuneConfig
from pretrain.finetune import main as finetune
from pretrain.synthetic import make_organ_like


def main(argv: list[str] | None = None) -> dict:
    """Supervised organ pretraining (ResNet18, PTCGA200 layout) -> its best.pt imported as a
    backbone (project format) -> linear probes on PCam-like patches: imported vs random init."""
    parser = ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/pretrain_demo", help="folder of the three fine-tuning runs")
    parser.add_argument("--device", default="auto", choices=field_choices(FinetuneConfig)["device"],
                        help=field_comments(FinetuneConfig)["device"])
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    demo_args = ["--demo", "--device", args.device, "--resume", "false"]
    organ = make_organ_like(default_cache_dir("pretrain_organ_demo")).root / "PTCGA200"
    finetune(parse_config(FinetuneConfig, demo_args + [
        "--dataset", "ptcga200", "--data-root", str(organ), "--output-dir", str(out / "organ_pretrain"), "--epochs", "2"]))
    probe = demo_args + ["--linear-probe", "true", "--epochs", "1", "--lr", "3e-3"]
    results = {name: finetune(parse_config(FinetuneConfig, probe + ["--output-dir", str(out / f"probe_{name}")] + extra))
               for name, extra in (("random", []), ("imported", ["--backbone", str(out / "organ_pretrain" / "best.pt")]))}
    for name, r in results.items():
        print(f"linear probe, {name:8s} backbone: test acc {r['test']['acc']:.4f}  auc {r['test']['auc']:.4f}")
    return results


if __name__ == "__main__":
    with exit_on_user_error():
        main()
