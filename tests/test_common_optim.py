"""common.optim: Novograd (MONAI algorithm), LARS, and the schedules, against hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from common.optim import (LARS, FunctionScheduler, Novograd, cosine_annealing, cosine_ramp, scaled_lr,
                          split_decay_groups, warmup_cosine)


# ============================================================================= Novograd
def novograd_reference(params, grads_per_step, lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0,
                       grad_averaging=False, amsgrad=False):
    """Straight transcription of the update rule (reference/common.md section 1), one step at a time,
    on plain Python floats: returns the parameter lists after every step."""
    b1, b2 = betas
    p = [[float(v) for v in t.flatten()] for t in params]
    m = [[0.0] * len(t) for t in p]
    v = [0.0] * len(p)
    vmax = [0.0] * len(p)
    history = []
    for grads in grads_per_step:
        for i, g_t in enumerate(grads):
            g = [float(x) for x in g_t.flatten()]
            n = sum(x * x for x in g)
            v[i] = n if v[i] == 0 else b2 * v[i] + (1 - b2) * n
            vmax[i] = max(vmax[i], v[i])
            denom = math.sqrt(vmax[i] if amsgrad else v[i]) + eps
            g = [x / denom for x in g]
            if weight_decay:
                g = [x + weight_decay * w for x, w in zip(g, p[i])]
            if grad_averaging:
                g = [x * (1 - b1) for x in g]
            m[i] = [b1 * a + x for a, x in zip(m[i], g)]
            p[i] = [w - lr * a for w, a in zip(p[i], m[i])]
        history.append([list(t) for t in p])
    return history


def _run_novograd(shapes, steps, seed=0, zero_first=(), **kw):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (1 + k % 3) for s in shapes]
             for k in range(steps)]
    for k, i in zero_first:  # (step, param) pairs whose gradient is exactly zero
        grads[k][i] = torch.zeros(shapes[i], dtype=torch.float64)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Novograd(params, **kw)
    got = []
    for g_step in grads:
        for p, g in zip(params, g_step):
            p.grad = g.clone()
        opt.step()
        got.append([p.detach().flatten().tolist() for p in params])
    ref = novograd_reference(init, grads, **kw)
    return got, ref, opt, params


SHAPES = [(3, 4), (4,), (2, 2, 3), ()]


@pytest.mark.parametrize("kw", [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.9), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.01, grad_averaging=True),
    dict(lr=0.02, weight_decay=0.05, grad_averaging=True, amsgrad=True),
    dict(lr=0.01, amsgrad=True),
], ids=["default", "betas-eps", "wd", "grad-avg", "all", "amsgrad"])
def test_novograd_matches_transcription_20_steps(kw):
    got, ref, _, _ = _run_novograd(SHAPES, 20, **kw)
    assert len(got) == 20
    for step_got, step_ref in zip(got, ref):
        for a, b in zip(step_got, step_ref):
            assert a == pytest.approx(b, rel=1e-12, abs=1e-14)


def test_novograd_hand_computed_scalar():
    # p = 1, g1 = 2, g2 = 1, lr 0.1, betas (0.9, 0.98), eps 1e-8 (worked by hand):
    # step 1: v = 4 (first value copied), g = 2 / (2 + 1e-8), m = g, p = 1 - 0.1 m
    # step 2: v = 0.98*4 + 0.02*1 = 3.94, g = 1 / (sqrt(3.94) + 1e-8), m = 0.9 m + g
    p = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    opt = Novograd([p], lr=0.1)
    p.grad = torch.tensor(2.0, dtype=torch.float64)
    opt.step()
    m1 = 2 / (2 + 1e-8)
    assert p.item() == pytest.approx(1 - 0.1 * m1, rel=1e-14)
    assert p.item() == pytest.approx(0.9, abs=1e-8)
    p.grad = torch.tensor(1.0, dtype=torch.float64)
    opt.step()
    m2 = 0.9 * m1 + 1 / (math.sqrt(3.94) + 1e-8)
    assert p.item() == pytest.approx(1 - 0.1 * m1 - 0.1 * m2, rel=1e-14)
    assert p.item() == pytest.approx(0.7596212, abs=1e-6)
    st = opt.state[p]
    assert st["step"] == 2 and isinstance(st["step"], int)
    assert st["exp_avg_sq"].ndim == 0 and st["exp_avg_sq"].item() == pytest.approx(3.94, rel=1e-14)


def test_novograd_state_layout_is_layer_wise():
    _, _, opt, params = _run_novograd(SHAPES, 3, lr=0.01, amsgrad=True)
    for p in params:
        st = opt.state[p]
        assert st["step"] == 3
        assert st["exp_avg"].shape == p.shape
        assert st["exp_avg_sq"].shape == torch.Size([])
        assert st["max_exp_avg_sq"].shape == torch.Size([])


def test_zero_second_moment_reinitialises_from_the_first_nonzero_gradient():
    # Step 1 gradient 0: v stays exactly 0 and nothing moves (0 / eps = 0).
    # Step 2 gradient 3: v = 9 (copied, NOT 0.98*0 + 0.02*9 = 0.18), so g/denom = 3/3 = 1.
    p = torch.nn.Parameter(torch.tensor([5.0], dtype=torch.float64))
    opt = Novograd([p], lr=0.5)
    p.grad = torch.zeros(1, dtype=torch.float64)
    opt.step()
    assert p.item() == 5.0 and opt.state[p]["exp_avg_sq"].item() == 0.0
    p.grad = torch.tensor([3.0], dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg_sq"].item() == 9.0
    assert p.item() == pytest.approx(5.0 - 0.5 * 3 / (3 + 1e-8), rel=1e-14)
    # and against the transcription with zero gradients on some tensors at some steps
    got, ref, _, _ = _run_novograd(SHAPES, 20, zero_first=[(0, 0), (1, 0), (0, 2), (5, 1)], lr=0.01)
    for step_got, step_ref in zip(got, ref):
        for a, b in zip(step_got, step_ref):
            assert a == pytest.approx(b, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("wd, averaging", [(0.0, False), (0.1, False), (0.1, True)])
def test_gradient_is_modified_in_place(wd, averaging):
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    g = torch.tensor([0.6, 0.8], dtype=torch.float64)  # norm 1
    p.grad = g.clone()
    grad_obj = p.grad
    Novograd([p], lr=0.1, weight_decay=wd, grad_averaging=averaging).step()
    expected = g / (1 + 1e-8) + wd * torch.tensor([3.0, -4.0], dtype=torch.float64)
    if averaging:
        expected = expected * (1 - 0.9)
    assert p.grad is grad_obj
    assert torch.allclose(p.grad, expected, rtol=1e-14, atol=0)
    assert torch.allclose(p.detach(), torch.tensor([3.0, -4.0], dtype=torch.float64) - 0.1 * expected, rtol=1e-14)


def test_amsgrad_keeps_the_maximum():
    # |g| = 4, then 1, then 1: v = 16, 0.98*16 + 0.02 = 15.7, ...; max stays 16 -> denom 4
    p = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = Novograd([p], lr=1.0, betas=(0.0, 0.98), eps=0.0, amsgrad=True)
    for g in (4.0, 1.0, 1.0):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    st = opt.state[p]
    assert st["max_exp_avg_sq"].item() == 16.0
    assert st["exp_avg_sq"].item() == pytest.approx(0.98 * (0.98 * 16 + 0.02) + 0.02, rel=1e-14)
    # beta1 = 0: each step moves by g / 4
    assert p.item() == pytest.approx(-(4 + 1 + 1) / 4, rel=1e-14)


def test_params_without_grad_are_skipped_and_sparse_rejected():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = Novograd([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Novograd(emb.parameters()).step()


@pytest.mark.parametrize("kw, word", [(dict(lr=-1), "learning rate"), (dict(eps=-1), "epsilon"),
                                      (dict(betas=(1.0, 0.9)), "index 0"), (dict(betas=(0.9, -0.1)), "index 1"),
                                      (dict(weight_decay=-0.1), "weight_decay")])
def test_novograd_validation(kw, word):
    with pytest.raises(ValueError, match=word):
        Novograd([torch.nn.Parameter(torch.ones(1))], **kw)


def test_novograd_defaults_and_state_round_trip():
    opt = Novograd([torch.nn.Parameter(torch.ones(1))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["grad_averaging"], g["amsgrad"]) == \
        (1e-3, (0.9, 0.98), 1e-8, 0.0, False, False)
    # interrupted after 7 steps, state saved/loaded into fresh objects == uninterrupted 20 steps
    got, _, _, _ = _run_novograd(SHAPES, 20, lr=0.01, amsgrad=True)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (1 + k % 3) for s in SHAPES] for k in range(20)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Novograd(params, lr=0.01, amsgrad=True)
    for k in range(20):
        if k == 7:
            sd = opt.state_dict()
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = Novograd(params, lr=0.01, amsgrad=True)
            opt.load_state_dict(sd)
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        opt.step()
    assert [p.detach().flatten().tolist() for p in params] == got[-1]


def test_old_state_without_amsgrad_defaults_to_false():
    p = torch.nn.Parameter(torch.ones(2))
    sd = Novograd([p]).state_dict()
    del sd["param_groups"][0]["amsgrad"]
    opt = Novograd([p], amsgrad=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["amsgrad"] is False


def test_novograd_under_grad_scaler_skips_inf_steps():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = Novograd([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p * torch.tensor([float("inf"), 1.0])).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0])) and len(opt.state) == 0
    assert scaler.get_scale() == 512.0
    opt.zero_grad()
    scaler.scale((p * torch.tensor([3.0, 4.0])).sum()).backward()
    scaler.step(opt)  # unscaled before Novograd sees it: g = (3, 4), v = 25, step = 0.1 * g / 5
    assert opt.state[p]["exp_avg_sq"].item() == pytest.approx(25.0, rel=1e-6)
    assert torch.allclose(p.detach(), torch.tensor([1 - 0.06, 2 - 0.08]), rtol=1e-6)


# ============================================================================= LARS
def test_lars_hand_computed_two_steps():
    # w = (3, 4), |w| = 5; g = (1, 0); wd 0.1 -> d = (1.3, 0.4), |d| = sqrt(1.85)
    # trust = 0.01 * 5 / sqrt(1.85); buf1 = d*trust; w1 = w - lr*buf1
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    w.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()
    d1 = [1.3, 0.4]
    t1 = 0.01 * 5 / math.sqrt(1.3 ** 2 + 0.4 ** 2)
    buf = [x * t1 for x in d1]
    w1 = [3 - 0.5 * buf[0], 4 - 0.5 * buf[1]]
    assert w.detach().tolist() == pytest.approx(w1, rel=1e-14)
    w.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opt.step()
    d2 = [0.1 * w1[0], 2 + 0.1 * w1[1]]
    t2 = 0.01 * math.hypot(*w1) / math.hypot(*d2)
    buf = [0.9 * b + x * t2 for b, x in zip(buf, d2)]
    assert w.detach().tolist() == pytest.approx([w1[0] - 0.5 * buf[0], w1[1] - 0.5 * buf[1]], rel=1e-14)


def test_lars_nesterov_and_zero_norm():
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # |w| = 0 -> ratio 1: plain SGD step
    opt = LARS([w], lr=0.1, momentum=0.5, nesterov=True)
    w.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    opt.step()
    # buf = g; nesterov update = g + 0.5 * buf = 1.5 g
    assert w.detach().tolist() == pytest.approx([-0.15, 0.3], rel=1e-14)


def test_split_decay_groups_turns_off_adaptation_for_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    groups = split_decay_groups(model, 0.05)
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(4, 3), (2, 4)]
    assert [tuple(p.shape) for p in groups[1]["params"]] == [(4,), (4,), (4,), (2,)]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    opt = LARS(groups, lr=0.1, momentum=0.0, weight_decay=0.05)
    bias = model[0].bias
    before = bias.detach().clone()
    model(torch.randn(5, 3)).sum().backward()
    g = bias.grad.clone()
    opt.step()
    assert torch.allclose(bias.detach(), before - 0.1 * g)  # plain SGD for the no-adaptation group


# ============================================================================= schedules
def test_cosine_annealing_camelyon_per_epoch_values():
    values = [cosine_annealing(e, 4, 1e-3) for e in range(5)]
    assert values[:4] == pytest.approx([1e-3, 8.536e-4, 5e-4, 1.464e-4], abs=1e-7)
    assert values[4] == pytest.approx(0.0, abs=1e-18)
    assert cosine_annealing(9, 4, 1e-3) == values[4]  # clamped after the end


@pytest.mark.parametrize("total, eta_min", [(4, 0.0), (10, 1e-5), (7, 2e-4)])
def test_cosine_annealing_equals_torch_cosine_annealing_lr(total, eta_min):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=eta_min)
    for epoch in range(total + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_annealing(epoch, total, 1e-3, eta_min),
                                                          rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_warmup_cosine_known_steps():
    f = lambda s: warmup_cosine(s, total_steps=110, warmup_steps=10, base=1.0, final=0.1, warmup_start=0.2)  # noqa: E731
    assert f(0) == pytest.approx(0.2, abs=1e-12)
    assert f(5) == pytest.approx(0.6, abs=1e-12)
    assert f(10) == pytest.approx(1.0, abs=1e-12)
    assert f(60) == pytest.approx(0.55, abs=1e-12)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1, abs=1e-12)
    assert f(500) == pytest.approx(0.1, abs=1e-12)
    assert warmup_cosine(3, 10, 0, 2.0) == pytest.approx(2.0 * (1 + math.cos(math.pi * 0.3)) / 2)


def test_cosine_ramp_known_steps():
    assert cosine_ramp(0, 100, 0.996, 1.0) == pytest.approx(0.996, abs=1e-12)
    assert cosine_ramp(50, 100, 0.996, 1.0) == pytest.approx(0.998, abs=1e-12)
    assert cosine_ramp(25, 100, 0.996, 1.0) == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_ramp(100, 100, 0.996, 1.0) == 1.0
    assert cosine_ramp(150, 100, 0.996, 1.0) == 1.0


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(0.1, 32) == pytest.approx(0.0125)  # real division, never 0
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0)


def test_function_scheduler_applies_fn_and_lr_scale_and_round_trips():
    p1, p2 = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=123.0)
    fn = lambda s: warmup_cosine(s, 20, 4, 0.8)  # noqa: E731
    sched = FunctionScheduler(opt, fn)
    assert sched.get_last_lr() == [0.0, 0.0]  # fn(0) applied at construction
    for _ in range(6):
        sched.step()
    assert sched.get_last_lr() == pytest.approx([fn(6), 0.5 * fn(6)])
    state = sched.state_dict()
    assert state == {"last_step": 6}
    opt2 = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=123.0)
    sched2 = FunctionScheduler(opt2, fn)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    sched.step()
    sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr() == pytest.approx([fn(7), 0.5 * fn(7)])
