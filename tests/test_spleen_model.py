"""spleen.model: MONAI UNet key layout (the bundle's model.pt loads strictly), sizes, blocks and the
DiceCE loss against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.checkpoint import CheckpointError
from spleen.model import DiceCELoss, ResidualUnit, UNet, build_model, load_unet_weights


def bundle_key_shapes(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), cin=1, cout=2, units=2) -> dict:
    """The MONAI UNet state_dict layout, written out from the reference's structure table."""
    shapes: dict[str, tuple] = {}

    def conv_unit(prefix, i, o, transposed=False, conv_only=False):
        shapes[f"{prefix}.conv.weight"] = (i, o, 3, 3, 3) if transposed else (o, i, 3, 3, 3)
        shapes[f"{prefix}.conv.bias"] = (o,)
        if not conv_only:
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{prefix}.adn.N.{name}"] = (o,)
            shapes[f"{prefix}.adn.N.num_batches_tracked"] = ()
            shapes[f"{prefix}.adn.A.weight"] = (1,)

    def res_unit(prefix, i, o, stride, n, last_conv_only=False):
        for k in range(n):
            conv_unit(f"{prefix}.conv.unit{k}", i if k == 0 else o, o, conv_only=last_conv_only and k == n - 1)
        if stride != 1:
            shapes[f"{prefix}.residual.weight"], shapes[f"{prefix}.residual.bias"] = (o, i, 3, 3, 3), (o,)
        elif i != o:
            shapes[f"{prefix}.residual.weight"], shapes[f"{prefix}.residual.bias"] = (o, i, 1, 1, 1), (o,)

    def level(prefix, i, o, chans, strs, top):
        res_unit(f"{prefix}.0", i, chans[0], strs[0], units)
        if len(chans) > 2:
            level(f"{prefix}.1.submodule", chans[0], chans[0], chans[1:], strs[1:], False)
            up_in = 2 * chans[0]
        else:
            res_unit(f"{prefix}.1.submodule", chans[0], chans[1], 1, units)
            up_in = chans[0] + chans[1]
        conv_unit(f"{prefix}.2.0", up_in, o, transposed=True)
        res_unit(f"{prefix}.2.1", o, o, 1, 1, last_conv_only=top)

    level("model", cin, cout, channels, strides, True)
    return shapes


def test_bundle_network_size_and_layout():
    model = build_model()
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 4_808_917
    assert len(sd) == 148
    assert {k: tuple(v.shape) for k, v in sd.items()} == bundle_key_shapes()
    for key, shape in {"model.0.conv.unit0.conv.weight": (16, 1, 3, 3, 3), "model.0.residual.weight": (16, 1, 3, 3, 3),
                       "model.1.submodule.0.residual.weight": (32, 16, 3, 3, 3),
                       "model.1.submodule.1.submodule.1.submodule.1.submodule.residual.weight": (256, 128, 1, 1, 1),
                       "model.1.submodule.1.submodule.1.submodule.2.0.conv.weight": (384, 64, 3, 3, 3),
                       "model.1.submodule.1.submodule.2.0.conv.weight": (128, 32, 3, 3, 3),
                       "model.1.submodule.2.0.conv.weight": (64, 16, 3, 3, 3),
                       "model.2.0.conv.weight": (32, 2, 3, 3, 3),
                       "model.2.0.adn.N.running_mean": (2,), "model.2.1.conv.unit0.conv.weight": (2, 2, 3, 3, 3),
                       "model.0.conv.unit0.adn.A.weight": (1,)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("model.2.1.conv.unit0.adn") or k.startswith("model.2.1.residual") for k in sd)


def test_defaults_prelu_batchnorm():
    model = build_model()
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert prelus and all(m.weight.numel() == 1 and float(m.weight.detach()) == 0.25 for m in prelus)
    assert bns and all(m.eps == 1e-5 and m.momentum == 0.1 for m in bns)


@pytest.mark.parametrize("wrap", ["flat", "module_prefix", "model_key"])
def test_bundle_checkpoint_loads_strictly(tmp_path, wrap):
    """A state_dict in the released model.pt layout (built from the reference table) loads strictly."""
    torch.manual_seed(0)
    sd = {k: torch.randn(s) if s else torch.tensor(7) for k, s in bundle_key_shapes().items()}
    obj = {"flat": sd, "module_prefix": {f"module.{k}": v for k, v in sd.items()}, "model_key": {"model": sd}}[wrap]
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    model = build_model()
    load_unet_weights(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_with_missing_or_extra_keys_fails(tmp_path):
    sd = build_model().state_dict()
    broken = {k: v for k, v in sd.items() if k != "model.2.0.conv.bias"}
    broken["model.3.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="model.2.0.conv.bias") as err:
        load_unet_weights(build_model(), tmp_path / "bad.pt")
    assert "model.3.weight" in str(err.value) and "bad.pt" in str(err.value)


def test_tiny_unet_shapes_and_divisibility():
    model = UNet(channels=(2, 4, 8), strides=(2, 2)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 12, 8, 16)).shape == (1, 2, 12, 8, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 10, 8, 8))


def test_residual_unit_adds_identity_shortcut_without_activation():
    torch.manual_seed(0)
    unit = ResidualUnit(3, 3, stride=1, subunits=2).eval()
    x = torch.randn(2, 3, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), unit.conv(x) + x)
        assert (unit(x) < 0).any()  # no activation after the sum
    assert isinstance(unit.residual, nn.Identity)


def test_skip_concatenates_input_first():
    model = UNet(channels=(2, 4), strides=(2,))
    skip = model.model[1]
    x = torch.randn(1, 2, 4, 4, 4)
    out = skip.eval()(x)
    assert out.shape == (1, 6, 4, 4, 4) and torch.equal(out[:, :2], x)


def test_dice_ce_matches_hand_computation():
    logits = torch.tensor([[[[[2.0, 0.0]]], [[[0.0, 1.0]]]]])  # (B=1, K=2, 1, 1, 2)
    label = torch.tensor([[[[[0, 1]]]]])
    p1 = np.exp([0.0, 1.0]) / (np.exp([2.0, 0.0]) + np.exp([0.0, 1.0]))
    p = np.stack([1 - p1, p1])  # (K, voxels)
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    dice = 1 - (2 * (p * g).sum(1) + 1e-5) / ((p ** 2).sum(1) + g.sum(1) + 1e-5)
    ce = -np.mean([np.log(p[0, 0]), np.log(p[1, 1])])
    expected = 0.5 * dice.mean() + 0.5 * ce
    assert float(DiceCELoss()(logits, label)) == pytest.approx(expected, rel=1e-6)


def test_dice_ce_is_batch_wise_and_near_zero_for_confident_correct_logits():
    label = torch.zeros(2, 1, 2, 2, 2, dtype=torch.uint8)
    label[0, 0, 0, 0, 0] = 1  # only the first sample has foreground
    logits = torch.where(torch.cat([label == 0, label == 1], 1), 30.0, -30.0).float()
    assert float(DiceCELoss()(logits, label)) < 1e-6
    # batch-wise: the foreground Dice is computed over both samples together, so a wrong
    # prediction of sample 1's empty foreground is diluted only by sample 0's voxel
    wrong = logits.clone()
    wrong[1, 0, 0, 0, 0], wrong[1, 1, 0, 0, 0] = -30.0, 30.0
    loss = DiceCELoss(lambda_dice=1.0, lambda_ce=0.0)(wrong, label)
    fg = 1 - (2 * 1 + 1e-5) / (2 + 1 + 1e-5)
    bg = 1 - (2 * 14 + 1e-5) / (14 + 15 + 1e-5)
    assert float(loss) == pytest.approx((fg + bg) / 2, rel=1e-5)
