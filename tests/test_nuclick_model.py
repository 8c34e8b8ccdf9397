"""nuclick/model.py: MONAI BasicUNet key layout, strict loading of bundle-style checkpoints, the
axis-order handling of the released (transposed) weights, and the Dice loss."""
from __future__ import annotations

import pytest
import torch

from common.checkpoint import CheckpointError, save_training_state
from nuclick.model import BUNDLE_FEATURES, build_model, count_parameters, dice_loss, load_nuclick_weights

TINY = (4, 8, 8, 8, 8, 4)


pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions: threads only add overhead


def bundle_key_shapes(f=BUNDLE_FEATURES, cin: int = 5) -> dict[str, tuple[int, ...]]:
    """MONAI BasicUNet(2-D) state_dict as described in nuclick.md §6, written out independently."""
    shapes: dict[str, tuple[int, ...]] = {}

    def two_conv(prefix: str, a: int, b: int) -> None:
        for j, (i, o) in enumerate(((a, b), (b, b))):
            shapes[f"{prefix}.conv_{j}.conv.weight"] = (o, i, 3, 3)
            shapes[f"{prefix}.conv_{j}.conv.bias"] = (o,)
            shapes[f"{prefix}.conv_{j}.adn.N.weight"] = (o,)
            shapes[f"{prefix}.conv_{j}.adn.N.bias"] = (o,)

    two_conv("conv_0", cin, f[0])
    for k in range(1, 5):
        two_conv(f"down_{k}.convs", f[k - 1], f[k])
    for k, (cin_up, cat, out, halves) in {4: (f[4], f[3], f[3], True), 3: (f[3], f[2], f[2], True),
                                          2: (f[2], f[1], f[1], True), 1: (f[1], f[0], f[5], False)}.items():
        up = cin_up // 2 if halves else cin_up
        shapes[f"upcat_{k}.upsample.deconv.weight"] = (cin_up, up, 2, 2)
        shapes[f"upcat_{k}.upsample.deconv.bias"] = (up,)
        two_conv(f"upcat_{k}.convs", cat + up, out)
    shapes["final_conv.weight"] = (1, f[5], 1, 1)
    shapes["final_conv.bias"] = (1,)
    return shapes


def test_bundle_key_layout_and_size():
    model = build_model()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == bundle_key_shapes()
    assert count_parameters(model) == (7_784_001, 82)
    assert got["conv_0.conv_0.conv.weight"] == (32, 5, 3, 3) and got["upcat_1.convs.conv_0.conv.weight"] == (32, 96, 3, 3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 18 and all(m.affine and not m.track_running_stats and m.eps == 1e-5 for m in norms)
    acts = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(m.negative_slope == 0.1 for m in acts)


def test_bundle_style_checkpoint_loads_strictly(tmp_path):
    """A flat state_dict in MONAI's layout (with DDP's module. prefix) loads; the widths come from it."""
    g = torch.Generator().manual_seed(0)
    sd = {f"module.{k}": torch.randn(s, generator=g) for k, s in bundle_key_shapes(TINY).items()}
    torch.save(sd, tmp_path / "model.pt")
    model, info = load_nuclick_weights(tmp_path / "model.pt")
    assert info["kind"] == "bundle state_dict" and info["axis_order"] == "wh" and info["features"] == list(TINY)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[f"module.{k}"])
    del sd["module.final_conv.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing=.*final_conv.bias"):
        load_nuclick_weights(tmp_path / "missing.pt")
    sd["module.final_conv.bias"] = torch.zeros(1)
    sd["module.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected=.*extra.weight"):
        load_nuclick_weights(tmp_path / "extra.pt")


def test_axis_order_of_project_and_bundle_checkpoints(tmp_path):
    net = build_model(TINY).eval()
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        plain, monai_path = net(x), net(x.transpose(-1, -2)).transpose(-1, -2)
    assert not torch.allclose(plain, monai_path, atol=1e-3)  # the network is not transpose-symmetric
    torch.save(net.state_dict(), tmp_path / "bundle.pt")
    save_training_state(tmp_path / "project.pt", model=net, epoch=1, step=1, extra={"axis_order": "hw"})
    bundle, info_b = load_nuclick_weights(tmp_path / "bundle.pt")
    project, info_p = load_nuclick_weights(tmp_path / "project.pt")
    forced, _ = load_nuclick_weights(tmp_path / "bundle.pt", axis_order="hw")
    with torch.no_grad():
        assert torch.equal(bundle(x), monai_path) and info_b["axis_order"] == "wh"
        assert torch.equal(project(x), plain) and info_p["axis_order"] == "hw" and info_p["epoch"] == 1
        assert torch.equal(forced(x), plain)


def _bar_batch(n: int, g: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Click -> target: a 3x13 horizontal bar centred on the positive click (anisotropic on purpose)."""
    x = torch.zeros(n, 5, size, size)
    x[:, :3] = torch.rand(n, 3, size, size, generator=g) * 0.2 - 0.1
    rows = torch.randint(8, size - 8, (n,), generator=g)
    cols = torch.randint(8, size - 8, (n,), generator=g)
    y = torch.zeros(n, 1, size, size)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        x[i, 3, r, c] = 1
        y[i, 0, r - 1:r + 2, c - 6:c + 7] = 1
    return x, y


def test_weights_trained_on_transposed_input_give_right_masks_through_bundle_path(tmp_path):
    """Train as MONAI does (inputs and targets transposed), save a bare state_dict, load it the
    bundle way: the masks are right in (row, col); without the transposition they are not."""
    torch.manual_seed(0)
    net = build_model((4, 8, 8, 8, 8, 4))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = _bar_batch(8, g)
        loss = dice_loss(net(x.transpose(-1, -2)), y.transpose(-1, -2))  # MONAI's (W, H) layout
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    model, info = load_nuclick_weights(tmp_path / "model.pt")
    x, y = _bar_batch(32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        mask = (torch.sigmoid(model(x)) >= 0.5).float()
        reference = (torch.sigmoid(net.eval()(x.transpose(-1, -2))) >= 0.5).float().transpose(-1, -2)
        untransposed = (torch.sigmoid(net(x)) >= 0.5).float()

    def dice(p):
        return float(2 * (p * y).sum() / (p.sum() + y.sum()))

    assert info["axis_order"] == "wh"
    assert torch.equal(mask, reference)
    assert dice(mask) > 0.9 and dice(untransposed) < 0.5


def test_dice_loss_hand_values():
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, :] = 1  # 2 foreground pixels; sample 1 empty
    logits = torch.zeros(2, 1, 2, 2)  # p = 0.5 everywhere
    s = 1e-5
    first = 1 - (2 * 1.0 + s) / (4 * 0.25 + 2 + s)  # sum(pg) = 1, sum(p^2) = 1, sum(g^2) = 2
    second = 1 - s / (1.0 + s)
    assert dice_loss(logits, target).item() == pytest.approx((first + second) / 2, rel=1e-6)
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert dice_loss(perfect[:1], target[:1]).item() == pytest.approx(0.0, abs=1e-6)


def test_upcat_replicate_pads_the_trailing_side():
    """MONAI UpCat: an upsampled map smaller than the encoder feature gets one replicated row/column
    at the end; the concatenation order is [encoder, upsampled]."""
    from nuclick.model import UpCat

    block = UpCat(2, 1, 3)
    block.convs = torch.nn.Identity()  # expose the concatenated tensor
    x, skip = torch.randn(1, 2, 2, 2), torch.randn(1, 1, 5, 5)
    with torch.no_grad():
        out = block(x, skip)
        up = block.upsample(x)  # (1, 1, 4, 4)
    assert out.shape == (1, 2, 5, 5)
    assert torch.equal(out[:, :1], skip)
    assert torch.equal(out[0, 1, :4, :4], up[0, 0])
    assert torch.equal(out[0, 1, 4, :4], up[0, 0, 3]) and torch.equal(out[0, 1, :4, 4], up[0, 0, :, 3])
    model = build_model(TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 5, 40, 36)).shape == (1, 1, 40, 36)
