"""TorchScript and ONNX export of a NuClick checkpoint, each checked numerically against PyTorch.

    python nuclick/export.py --checkpoint runs/nuclick/best.pt --output-dir exported/
    trtexec --onnx=exported/nuclick.onnx --fp16 ...                # on a GPU machine (TensorRT)

The exported graph takes (B, 5, H, W) in (row, col) order (RGB in [-1, 1], positive and negative
click maps) and returns logits (B, 1, H, W); the axis order of the weights (the bundle's
transposition, nuclick/model.py) is baked into the graph, so consumers never transpose. The batch
axis is dynamic; H and W are fixed at ``--bb-size`` (128, the click box). The check runs both
exports on a random batch of 2 and compares with the PyTorch model (ONNX through onnxruntime on
the CPU, an optional dependency); the largest absolute difference must stay under ``--atol``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_write, atomic_write_text
from common.config import parse_config
from common.errors import exit_on_user_error
from nuclick.config import ExportConfig
from nuclick.model import BasicUNet, load_nuclick_weights


def example_input(bb: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A reproducible (batch, 5, bb, bb) input: image channels in [-1, 1] and one click each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 5, bb, bb, generator=g) * 2 - 1
    x[:, 3:] = 0
    x[:, 3, bb // 2, bb // 2] = 1
    x[:, 4, bb // 4, bb // 3] = 1
    return x


def export_torchscript(model: BasicUNet, path: Path, example: torch.Tensor) -> Path:
    """Trace (the axis-order branch is a Python constant) and save atomically."""
    with warnings.catch_warnings():
        # tracer warnings about the shape-dependent padding (fixed at this size) and TorchScript's
        # deprecation notice (it is still the format TensorRT/C++ consumers ask for)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        atomic_write(path, lambda fh: torch.jit.save(traced, fh))
    return path


def export_onnx(model: BasicUNet, path: Path, example: torch.Tensor, opset: int = 17) -> Path:
    """ONNX with a dynamic batch axis (TorchScript-based exporter; needs the ``onnx`` package)."""
    try:
        import onnx  # noqa: F401  (torch's exporter serialises through it)
    except ImportError:
        raise SystemExit("ONNX export needs the onnx package: pip install -r requirements-dev.txt") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    tmp.replace(path)
    return path


def check_torchscript(path: Path, reference: torch.Tensor, x: torch.Tensor) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still the format asked for
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return float((loaded(x) - reference).abs().max())


def check_onnx(path: Path, reference: torch.Tensor, x: torch.Tensor) -> float | None:
    """Max |onnxruntime - PyTorch|, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn("onnxruntime is not installed: the ONNX export was not checked (pip install onnxruntime)")
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"input": x.numpy()})
    return float(np.abs(out - reference.numpy()).max())


def run(cfg: ExportConfig) -> dict:
    if not cfg.checkpoint:
        raise SystemExit("export.py needs --checkpoint FILE")
    model, info = load_nuclick_weights(cfg.checkpoint, cfg.axis_order or None)
    model = model.float().eval()
    out = Path(cfg.output_dir)
    example = example_input(cfg.bb_size)
    check = example_input(cfg.bb_size, batch=3, seed=1)  # a different batch size than traced
    with torch.no_grad():
        reference = model(check)
    result = {"checkpoint": info, "files": {}, "max_abs_diff": {}}
    if "torchscript" in cfg.formats:
        path = export_torchscript(model, out / "nuclick.ts", example)
        result["files"]["torchscript"], result["max_abs_diff"]["torchscript"] = str(path), check_torchscript(path, reference, check)
    if "onnx" in cfg.formats:
        path = export_onnx(model, out / "nuclick.onnx", example, cfg.opset)
        result["files"]["onnx"], result["max_abs_diff"]["onnx"] = str(path), check_onnx(path, reference, check)
    failed = {k: v for k, v in result["max_abs_diff"].items() if v is not None and not v <= cfg.atol}
    atomic_write_text(out / "export.json", json.dumps(result, indent=2) + "\n")
    for fmt, diff in result["max_abs_diff"].items():
        print(f"{fmt}: {result['files'][fmt]}  max |diff| vs PyTorch = {diff if diff is None else f'{diff:.2e}'}")
    if failed:
        raise RuntimeError(f"exported model(s) differ from PyTorch by more than {cfg.atol}: {failed}")
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        run(parse_config(ExportConfig))
