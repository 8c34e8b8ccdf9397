"""nuclick/export.py: TorchScript and ONNX exports match the PyTorch model (onnxruntime on CPU)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort  # test-only dependency (requirements-dev.txt)
import pytest
import torch

from common.checkpoint import save_training_state
from nuclick.config import ExportConfig
from nuclick.export import example_input, run
from nuclick.model import build_model

TINY = (4, 8, 8, 8, 8, 4)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")]


def test_onnx_and_torchscript_match_pytorch(tmp_path):
    torch.manual_seed(0)
    net = build_model(TINY).eval()
    torch.save(net.state_dict(), tmp_path / "bundle.pt")  # bare state_dict: axis order "wh" is baked in
    result = run(ExportConfig(checkpoint=str(tmp_path / "bundle.pt"), output_dir=str(tmp_path / "out"), bb_size=64))
    assert result["checkpoint"]["axis_order"] == "wh"
    assert result["max_abs_diff"]["onnx"] < 1e-4 and result["max_abs_diff"]["torchscript"] < 1e-5
    assert json.loads((tmp_path / "out" / "export.json").read_text())["files"]["onnx"].endswith("nuclick.onnx")

    x = example_input(64, batch=5, seed=3)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = net(x.transpose(-1, -2)).transpose(-1, -2).numpy()  # the MONAI layout, undone
    session = ort.InferenceSession(str(tmp_path / "out" / "nuclick.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4, rtol=0)
    scripted = torch.jit.load(str(tmp_path / "out" / "nuclick.ts"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), expected, atol=1e-5, rtol=0)


def test_project_checkpoint_exports_in_its_axis_order(tmp_path):
    torch.manual_seed(1)
    net = build_model(TINY).eval()
    save_training_state(tmp_path / "best.pt", model=net, epoch=3, step=30, extra={"axis_order": "hw"})
    result = run(ExportConfig(checkpoint=str(tmp_path / "best.pt"), output_dir=str(tmp_path / "out"),
                              formats=["torchscript"], bb_size=32))
    assert result["checkpoint"]["axis_order"] == "hw" and "onnx" not in result["files"]
    x = example_input(32, batch=2, seed=5)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(result["files"]["torchscript"])(x).numpy(), net(x).numpy(), atol=1e-5)
