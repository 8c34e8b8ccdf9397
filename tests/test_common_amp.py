"""common.amp: precision resolution, autocast dtype, the scaler only for fp16, unscale before clip,
skipped steps on inf gradients, stop on a non-finite loss, scaler state round trip."""
from __future__ import annotations

import math

import pytest
import torch

from common.amp import MixedPrecision, NonFiniteLossError, grad_norm_is_finite, resolve_dtype
from common.optim import Novograd

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision, device, dtype", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.float16), ("fp32", "cpu", torch.float32),
    ("bf16", "cpu", torch.bfloat16), ("fp16", "cuda", torch.float16), ("bf16", "cuda", torch.bfloat16)])
def test_resolve_dtype(precision, device, dtype):
    assert resolve_dtype(precision, torch.device(device)) is dtype


def test_resolve_dtype_refusals():
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA; use --precision bf16 or fp32"):
        resolve_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, fp16, bf16; got 'half'"):
        resolve_dtype("half", CPU)


def test_fp32_is_a_no_op_path():
    amp = MixedPrecision(CPU, "fp32")
    assert not amp.enabled and not amp.scaler.is_enabled()
    lin = torch.nn.Linear(4, 4)
    with amp.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    assert amp.state_dict() == {}


def test_bf16_autocasts_without_a_scaler():
    amp = MixedPrecision(CPU, "bf16")
    assert amp.enabled and amp.dtype is torch.bfloat16 and not amp.scaler.is_enabled()
    lin = torch.nn.Linear(4, 4)
    with amp.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    assert lin(torch.randn(2, 4)).dtype == torch.float32  # only inside the context


def test_step_equals_a_plain_optimizer_step_when_the_scaler_is_off():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3)
    opt_a, opt_b = Novograd(a.parameters(), lr=0.1), Novograd(b.parameters(), lr=0.1)
    MixedPrecision(CPU, "fp32").backward_step(a(x).pow(2).sum(), opt_a)
    b(x).pow(2).sum().backward()
    opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.grad is None for p in a.parameters())  # zero_grad(set_to_none=True)


def test_accumulation_divides_the_loss():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    amp = MixedPrecision(CPU, "fp32")
    amp.backward((p * 3).sum(), accumulation=2)
    amp.backward((p * 5).sum(), accumulation=2)
    assert p.grad.item() == pytest.approx((3 + 5) / 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_stops_before_backward(bad):
    p = torch.nn.Parameter(torch.tensor([1.0]))
    with pytest.raises(NonFiniteLossError, match=f"loss is {bad}; stopping"):
        MixedPrecision(CPU, "fp32").backward((p * bad).sum())
    assert p.grad is None
    assert grad_norm_is_finite(1.0) and not grad_norm_is_finite(bad)


def test_clip_returns_the_norm_before_clipping():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    amp = MixedPrecision(CPU, "fp32")
    amp.backward((p * torch.tensor([3.0, 4.0])).sum())
    norm = amp.step(opt, params=[p], clip_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert p.detach().tolist() == pytest.approx([-0.6, -0.8])  # clipped to norm 1
    assert math.isnan(amp.step(opt))  # no clipping asked: norm not computed


def _scaled_amp(init_scale=1024.0):
    """MixedPrecision with an enabled (fp16-style) scaler, which CPU can run for the bookkeeping."""
    amp = MixedPrecision(CPU, "fp32")
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return amp


def test_unscale_happens_before_clipping_with_an_active_scaler():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    amp = _scaled_amp()
    amp.backward((p * torch.tensor([3.0, 4.0])).sum())
    assert p.grad.tolist() == [3.0 * 1024, 4.0 * 1024]  # scaled
    norm = amp.step(opt, params=[p], clip_norm=1.0)
    assert norm == pytest.approx(5.0)  # measured on unscaled gradients
    assert p.detach().tolist() == pytest.approx([-0.6, -0.8])


def test_inf_gradients_skip_the_step_and_back_off_the_scale():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = Novograd([p], lr=0.1)
    amp = _scaled_amp()
    amp.backward((p * torch.tensor([1e38, 1.0])).sum())  # finite loss, grad overflows once scaled
    norm = amp.step(opt, params=[p], clip_norm=1.0)
    assert math.isinf(norm) or math.isnan(norm)
    assert p.detach().tolist() == [1.0, 1.0] and len(opt.state) == 0  # Novograd never ran
    assert amp.scaler.get_scale() == 512.0


def test_scaler_state_round_trip():
    amp = _scaled_amp(init_scale=256.0)
    p = torch.nn.Parameter(torch.tensor([1.0]))
    amp.backward((p * 1e38).sum())
    amp.step(torch.optim.SGD([p], lr=0.1))
    state = amp.state_dict()
    assert state["scale"] == 128.0
    other = _scaled_amp(init_scale=65536.0)
    other.load_state_dict(state)
    assert other.scaler.get_scale() == 128.0
    disabled = MixedPrecision(CPU, "fp32")
    disabled.load_state_dict(state)  # ignored: bf16/fp32 runs may resume fp16 checkpoints
    assert disabled.state_dict() == {}
    disabled.load_state_dict({})
    disabled.load_state_dict(None)


def test_a_clip_hook_replaces_the_total_norm_and_runs_on_unscaled_gradients():
    """A recipe's own clipping rule (DINO: each parameter's norm) goes through the same path."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([a, b], lr=1.0)
    amp = _scaled_amp()
    seen = []

    def per_parameter(params, clip):
        seen.append([p.grad.clone() for p in params])
        norms = [p.grad.norm() for p in params]
        for p, n in zip(params, norms):
            p.grad.mul_(min(clip / float(n), 1.0))
        return torch.stack(norms).max()

    amp.backward((a * torch.tensor([3.0, 4.0])).sum() + (b * 0.5).sum())
    norm = amp.step(opt, params=[a, b], clip_norm=1.0, clip_fn=per_parameter, zero_grad=True)
    assert [g.tolist() for g in seen[0]] == [[3.0, 4.0], [0.5]]  # unscaled before the hook
    assert norm == pytest.approx(5.0)
    assert a.detach().tolist() == pytest.approx([-0.6, -0.8]) and b.item() == pytest.approx(-0.5)  # each on its own
    assert a.grad is None and b.grad is None  # zero_grad(set_to_none=True)


def test_clip_norm_zero_means_no_clipping():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    amp = MixedPrecision(CPU, "fp32")
    assert math.isnan(amp.backward_step((p * torch.tensor([3.0, 4.0])).sum(), opt, params=[p], clip_norm=0.0))
    assert p.detach().tolist() == [-3.0, -4.0]
