"""Self-supervised objectives, methods and schedules (pretrain/losses.py, methods.py, schedule.py):
every value is checked against a hand-computed number or an independent reference formula written
here (naive double-loop NT-Xent, explicit DINO cross-entropy, hand MoCo/BYOL/DINO EMA updates), and
a 2-process gloo group shows that SimCLR's loss and gradient use the negatives of every process
and that MoCo's queue ends identical on every process."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.backbones import backbone_dim
from common_testutils import run_workers
from pretrain.losses import DINOLoss, byol_loss, mae_loss, nt_xent, patchify, teacher_temperature
from pretrain.methods import (BYOL, DINO, MAE, DINOHead, MoCo, WeightNormLinear, ema_update, random_masking,
                              sincos_pos_embed)
from pretrain.schedule import clip_per_parameter, lr_at, peak_lr, weight_decay_at


class TinyBackbone(nn.Module):
    """Linear (+ BatchNorm) + ReLU on flattened (n, 3, 2, 2) images; ``num_features`` makes
    :func:`common.backbones.backbone_dim` work as for a timm model."""

    def __init__(self, width: int = 6, bn: bool = True):
        super().__init__()
        self.num_features = width
        self.fc = nn.Linear(12, width)
        self.bn = nn.BatchNorm1d(width) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.fc(x.flatten(1))))  # (n, 12) -> (n, width)


def naive_nt_xent_per_anchor(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> list[float]:
    """SimCLR's l(i, j) = -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t)) with python loops over
    the 2N anchors (view-1 anchors first, then view-2 anchors)."""
    z = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in torch.cat([z1, z2]).double().tolist()]
    big_n, losses = len(z1), []
    for i in range(2 * big_n):
        pos = (i + big_n) % (2 * big_n)
        sims = [sum(a * b for a, b in zip(z[i], z[k])) / temperature for k in range(2 * big_n)]
        denom = sum(math.exp(sims[k]) for k in range(2 * big_n) if k != i)
        losses.append(-math.log(math.exp(sims[pos]) / denom))
    return losses


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in module.buffers()]


def test_tiny_backbone_is_accepted_by_backbone_dim():
    assert backbone_dim(TinyBackbone(width=7)) == 7


# ============================================================================= 1. NT-Xent
def test_nt_xent_identical_views_orthogonal_images():
    # 3 images, both views = e_i: positive cosine 1, the 2N - 2 = 4 negatives cosine 0
    z = torch.eye(3, 5)
    # hand: -log(e^{1/0.5} / (e^{1/0.5} + 4 e^0)) = log(1 + 4 e^-2), e^2 = 7.38905609893065
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(0.4326529029917915, abs=1e-6)
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log((7.38905609893065 + 4) / 7.38905609893065),
                                                              abs=1e-6)


def test_nt_xent_two_images_hand_cosines():
    # 2-D unit vectors: image 0 views at 0 and 60 degrees, image 1 views at 90 and 150 degrees
    def unit(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    z1 = torch.tensor([unit(0), unit(90)])
    z2 = torch.tensor([unit(60), unit(150)])
    # cosines: (0,60)=1/2, (0,90)=0, (0,150)=-r3/2, (60,90)=r3/2, (60,150)=0, (90,150)=1/2; t = 0.5 doubles them
    r3 = math.sqrt(3)
    loss_0deg = math.log(1 + math.exp(0 - 1) + math.exp(-r3 - 1))  # pos 1, negs 0 and -r3
    loss_90deg = math.log(1 + math.exp(r3 - 1) + math.exp(0 - 1))  # pos 1 (150), negs 0 (0 deg), r3 (60)
    loss_60deg = math.log(1 + math.exp(r3 - 1) + math.exp(0 - 1))  # pos 1 (0), negs r3 (90), 0 (150)
    loss_150deg = math.log(1 + math.exp(-r3 - 1) + math.exp(0 - 1))  # pos 1 (90), negs -r3 (0), 0 (60)
    expected = (loss_0deg + loss_90deg + loss_60deg + loss_150deg) / 4
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(expected, abs=1e-6)
    # by hand: e^-1 = 0.367879, e^(-r3-1) = 0.065086, e^(r3-1) = 2.079341
    assert expected == pytest.approx((math.log(1.432965) + math.log(3.447220)) / 2, abs=1e-6)


def test_nt_xent_matches_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.2, 1.0):
        naive = naive_nt_xent_per_anchor(z1, z2, t)
        assert nt_xent(z1, z2, t).item() == pytest.approx(sum(naive) / len(naive), abs=1e-6, rel=1e-6)
    # embeddings are L2-normalised: scaling them does not change the loss
    assert nt_xent(7 * z1, 0.3 * z2, 0.2).item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), abs=1e-6)


def test_nt_xent_temperature_scaling():
    z, big_n = torch.eye(4, 4), 4
    losses = []
    for t in (0.05, 0.1, 0.5, 1.0, 5.0):
        hand = math.log(1 + (2 * big_n - 2) * math.exp(-1 / t))
        losses.append(nt_xent(z, z.clone(), t).item())
        assert losses[-1] == pytest.approx(hand, abs=1e-6)
    assert losses == sorted(losses) and losses[0] < 1e-6  # sharper temperature: smaller loss here
    assert nt_xent(z, z.clone(), 1e4).item() == pytest.approx(math.log(2 * big_n - 1), abs=1e-3)  # uniform


# ============================================================================= 2. MoCo
def make_moco(queue_size: int = 10, momentum: float = 0.9, bn: bool = True, seed: int = 0) -> MoCo:
    torch.manual_seed(seed)
    return MoCo(TinyBackbone(bn=bn), out_dim=4, queue_size=queue_size, momentum=momentum, temperature=0.2)


def test_moco_enqueue_order_pointer_and_wrap_around():
    moco = make_moco(queue_size=10)
    batches = [torch.arange(16, dtype=torch.float).view(4, 4) + 100 * b for b in range(3)]  # (4 keys, dim 4)
    moco.enqueue(batches[0])
    assert int(moco.queue_ptr) == 4 and torch.equal(moco.queue[:, 0:4], batches[0].T)
    moco.enqueue(batches[1])
    assert int(moco.queue_ptr) == 8 and torch.equal(moco.queue[:, 4:8], batches[1].T)
    moco.enqueue(batches[2])  # columns 8, 9, 0, 1
    assert int(moco.queue_ptr) == 2
    assert torch.equal(moco.queue[:, 8], batches[2][0]) and torch.equal(moco.queue[:, 9], batches[2][1])
    assert torch.equal(moco.queue[:, 0], batches[2][2]) and torch.equal(moco.queue[:, 1], batches[2][3])
    assert torch.equal(moco.queue[:, 2:4], batches[0][2:4].T)  # untouched
    moco.enqueue(torch.ones(10, 4))  # exactly K keys: fills the whole queue, pointer unchanged
    assert int(moco.queue_ptr) == 2 and torch.equal(moco.queue, torch.ones(4, 10))
    with pytest.raises(ValueError, match="11 keys per step exceed the queue size 10"):
        moco.enqueue(torch.zeros(11, 4))


def test_moco_forward_uses_old_queue_and_momentum_updates_key_encoder():
    moco = make_moco(queue_size=10, momentum=0.9)
    with torch.no_grad():  # make key and query encoders differ
        for p in list(moco.key_backbone.parameters()) + list(moco.key_head.parameters()):
            p.add_(0.5)
    q_params = params(moco.backbone) + params(moco.head)
    k_params = params(moco.key_backbone) + params(moco.key_head)
    old_queue = moco.queue.clone()
    g = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(3, 3, 2, 2, generator=g), torch.randn(3, 3, 2, 2, generator=g)

    # independent reference on a copy: hand EMA of the key encoder, then the MoCo logits
    ref = make_moco(queue_size=10, momentum=0.9)
    ref.load_state_dict(moco.state_dict())
    with torch.no_grad():
        for p, k0, q0 in zip(list(ref.key_backbone.parameters()) + list(ref.key_head.parameters()), k_params,
                             q_params):
            p.copy_(0.9 * k0 + 0.1 * q0)
        q = F.normalize(ref.head(ref.backbone(v0)), dim=1)
        k = F.normalize(ref.key_head(ref.key_backbone(v1)), dim=1)
    logits_old = torch.cat([(q * k).sum(1, keepdim=True), q @ old_queue], 1) / 0.2
    expected = F.cross_entropy(logits_old, torch.zeros(3, dtype=torch.long)).item()

    loss, _ = moco([v0, v1])
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # key params = m k + (1 - m) q after one forward; query params untouched
    for p, k0, q0 in zip(list(moco.key_backbone.parameters()) + list(moco.key_head.parameters()), k_params, q_params):
        assert torch.allclose(p, 0.9 * k0 + 0.1 * q0, atol=1e-7)
    for p, q0 in zip(list(moco.backbone.parameters()) + list(moco.head.parameters()), q_params):
        assert torch.equal(p, q0)
    # this step's keys were enqueued after the logits: columns 0..2, pointer 3
    assert int(moco.queue_ptr) == 3 and torch.allclose(moco.queue[:, :3], k.T, atol=1e-6)
    assert torch.equal(moco.queue[:, 3:], old_queue[:, 3:])
    logits_new = torch.cat([(q * k).sum(1, keepdim=True), q @ moco.queue], 1) / 0.2
    assert abs(F.cross_entropy(logits_new, torch.zeros(3, dtype=torch.long)).item() - expected) > 1e-3


# ============================================================================= 3. BYOL
def make_byol() -> BYOL:
    torch.manual_seed(0)
    return BYOL(TinyBackbone(bn=True), hidden=8, out_dim=4)


def test_byol_tau_schedule():
    byol = make_byol()
    for step, tau in ((0, 0.99), (50, 0.995), (100, 1.0), (150, 1.0)):
        assert byol.after_update(step, 100)["tau"] == pytest.approx(tau, abs=1e-12)
        assert byol.tau == pytest.approx(tau, abs=1e-12)
    # a quarter of the way: 1 - 0.01 (1 + cos(pi/4)) / 2
    assert byol.after_update(25, 100)["tau"] == pytest.approx(1 - 0.01 * (1 + math.sqrt(0.5)) / 2, abs=1e-12)


def test_ema_update_parameters_only():
    torch.manual_seed(0)
    target, online = TinyBackbone(), TinyBackbone()
    online.bn.running_mean.fill_(5.0)
    online.bn.running_var.fill_(3.0)
    t0, o0, tb0 = params(target), params(online), buffers(target)
    ema_update(target, online, 0.9)
    for p, a, b in zip(target.parameters(), t0, o0):
        assert torch.allclose(p, 0.9 * a + 0.1 * b, atol=1e-7)
    for b, b0 in zip(target.buffers(), tb0):
        assert torch.equal(b, b0)
    with pytest.raises(ValueError, match="differ in structure"):
        ema_update(target, nn.Linear(2, 2), 0.9)


def test_byol_after_update_target_is_hand_ema_and_keeps_bn_stats():
    byol = make_byol()
    online = [byol.backbone, byol.projector]
    target = [byol.target_backbone, byol.target_projector]
    with torch.no_grad():
        for m in online:
            for p in m.parameters():
                p.add_(1.0)
            for name, b in m.named_buffers():
                if "running" in name:
                    b.fill_(7.0)
    t0 = [params(m) for m in target]
    o0 = [params(m) for m in online]
    tb0 = [buffers(m) for m in target]
    logs = byol.after_update(50, 100)
    assert logs["tau"] == pytest.approx(0.995)
    for m, a_list, b_list, buf_list in zip(target, t0, o0, tb0):
        for p, a, b in zip(m.parameters(), a_list, b_list):
            assert torch.allclose(p, 0.995 * a + 0.005 * b, atol=1e-6)
        for b, b0 in zip(m.buffers(), buf_list):
            assert torch.equal(b, b0)  # BN running stats of the target are not averaged
    assert not any(p.requires_grad for m in target for p in m.parameters())


def test_byol_loss_hand_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)  # identical direction
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)  # opposite
    assert byol_loss(p, torch.tensor([[0.0, 5.0], [1.0, 0.0]])).item() == pytest.approx(2.0, abs=1e-6)  # orthogonal
    # mean over the batch: (0 + 4) / 2; 60 degrees: 2 - 2 * 0.5 = 1
    assert byol_loss(p, torch.tensor([[1.0, 0.0], [0.0, -1.0]])).item() == pytest.approx(2.0, abs=1e-6)
    assert byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, math.sqrt(3) / 2]])).item() == \
        pytest.approx(1.0, abs=1e-6)


# ============================================================================= 4. DINO
def test_teacher_temperature_warmup():
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04, abs=1e-12)
    assert teacher_temperature(29, 0.04, 0.07, 30) == pytest.approx(0.07, abs=1e-12)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 15 / 29, abs=1e-12)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(np.linspace(0.04, 0.07, 30)[15], abs=1e-12)
    assert teacher_temperature(30, 0.04, 0.07, 30) == 0.07 and teacher_temperature(99, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07  # no warm-up


def test_dino_loss_center_update():
    loss = DINOLoss(3, n_crops=2)
    loss.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    teacher = torch.tensor([[0.0, 2.0, 4.0], [2.0, 2.0, 0.0]])  # 2 crops x B=1, mean (1, 2, 2)
    loss(torch.zeros(2, 3), teacher, epoch=0)
    assert torch.allclose(loss.center, torch.tensor([[1.0, 0.2, -0.7]]), atol=1e-7)  # 0.9 old + 0.1 mean


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def dino_reference(student, teacher, center, t_temp, s_temp, n_crops, batch):
    """Mean over (teacher global crop iq, student crop v != iq) of the batch-mean cross-entropy."""
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            term = 0.0
            for b in range(batch):
                t = _softmax([(x - c) / t_temp for x, c in zip(teacher[iq * batch + b], center)])
                s = _softmax([x / s_temp for x in student[v * batch + b]])
                term += -sum(tk * math.log(sk) for tk, sk in zip(t, s))
            total += term / batch
            terms += 1
    return total / terms


def test_dino_loss_value_on_a_tiny_case():
    # 2 global + 1 local crop, K = 3, B = 2; epoch 15 of a 0.04 -> 0.07 warm-up over 30 epochs
    student = torch.tensor([[0.1, 0.5, -0.2], [0.3, -0.1, 0.0], [0.2, 0.2, 0.9],
                            [-0.4, 0.1, 0.3], [0.0, 0.6, 0.1], [0.5, -0.3, 0.2]])
    teacher = torch.tensor([[0.02, 0.01, -0.01], [0.0, 0.03, 0.01], [-0.02, 0.0, 0.02], [0.01, 0.01, 0.0]])
    center = [0.01, -0.01, 0.0]
    loss = DINOLoss(3, n_crops=3, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                    student_temp=0.1)
    loss.center.copy_(torch.tensor([center]))
    t_temp = 0.04 + 0.03 * 15 / 29
    expected = dino_reference(student.tolist(), teacher.tolist(), center, t_temp, 0.1, 3, 2)
    assert loss(student, teacher, epoch=15).item() == pytest.approx(expected, abs=1e-5)
    # uniform student: every cross-entropy term is log K whatever the teacher
    fresh = DINOLoss(3, n_crops=3)
    assert fresh(torch.zeros(6, 3), teacher, epoch=0).item() == pytest.approx(math.log(3), abs=1e-6)


def make_dino(norm_last_layer: bool = True, freeze_last_layer: int = 1) -> DINO:
    torch.manual_seed(0)
    return DINO(TinyBackbone(bn=False), TinyBackbone(bn=False), out_dim=5, hidden=8, bottleneck=4,
                norm_last_layer=norm_last_layer, n_crops=3, base_momentum=0.996, freeze_last_layer=freeze_last_layer)


def test_dino_teacher_momentum_schedule_and_ema():
    dino = make_dino()
    assert all(torch.equal(a, b) for a, b in zip(dino.backbone.state_dict().values(),
                                                 dino.student.state_dict().values()))
    with torch.no_grad():
        for p in list(dino.student.parameters()) + list(dino.student_head.parameters()):
            p.add_(1.0)
    t0 = params(dino.backbone) + params(dino.teacher_head)
    s0 = params(dino.student) + params(dino.student_head)
    assert dino.after_update(1, 100)["teacher_momentum"] == pytest.approx(0.996, abs=1e-12)  # first update
    for p, a, b in zip(list(dino.backbone.parameters()) + list(dino.teacher_head.parameters()), t0, s0):
        assert torch.allclose(p, 0.996 * a + 0.004 * b, atol=1e-6)
    last = dino.after_update(100, 100)["teacher_momentum"]
    assert last == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * 99 / 100)) / 2, abs=1e-12)
    assert 0.99999 < last < 1.0
    assert dino.after_update(51, 100)["teacher_momentum"] == pytest.approx(0.998, abs=1e-12)  # half way


def _dino_backward(dino: DINO, epoch: int) -> None:
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(2, 3, 2, 2, generator=g) for _ in range(3)]
    dino.zero_grad(set_to_none=True)
    loss, logs = dino(views, epoch=epoch)
    loss.backward()
    dino.after_backward(epoch)


def test_dino_last_layer_frozen_in_first_epochs():
    dino = make_dino(norm_last_layer=False, freeze_last_layer=1)
    _dino_backward(dino, epoch=0)
    assert dino.student_head.last_layer.weight_v.grad is None and dino.student_head.last_layer.weight_g.grad is None
    assert dino.student_head.mlp[0].weight.grad is not None and dino.student.fc.weight.grad.abs().sum() > 0
    _dino_backward(dino, epoch=1)
    assert dino.student_head.last_layer.weight_v.grad.abs().sum() > 0
    assert dino.student_head.last_layer.weight_g.grad is not None
    assert all(p.grad is None for p in dino.backbone.parameters())  # teacher gets no gradient
    normed = make_dino(norm_last_layer=True)
    assert not normed.student_head.last_layer.weight_g.requires_grad


def test_weight_norm_linear_rows_have_norm_g():
    torch.manual_seed(0)
    layer = WeightNormLinear(4, 3)
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[2.0], [0.5], [3.0]]))
    weight = layer(torch.eye(4)).T  # x = I: F.linear(I, W) = W^T, so (out=3, in=4)
    assert torch.allclose(weight.norm(dim=1), torch.tensor([2.0, 0.5, 3.0]), atol=1e-6)
    direction = layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(weight, layer.weight_g * direction, atol=1e-6)
    head = DINOHead(6, out_dim=5, hidden=8, bottleneck=4)
    assert torch.allclose(head.last_layer(torch.eye(4)).T.norm(dim=1), torch.ones(5), atol=1e-6)  # g = 1


def test_weight_decay_schedule():
    cfg = SimpleNamespace(weight_decay=0.04, weight_decay_end=0.4)
    assert weight_decay_at(0, cfg, 100) == pytest.approx(0.04, abs=1e-12)
    assert weight_decay_at(50, cfg, 100) == pytest.approx(0.22, abs=1e-12)
    assert weight_decay_at(100, cfg, 100) == pytest.approx(0.4, abs=1e-12)
    assert weight_decay_at(25, cfg, 100) == pytest.approx(0.4 - 0.36 * (1 + math.sqrt(0.5)) / 2, abs=1e-12)
    constant = SimpleNamespace(weight_decay=1e-4, weight_decay_end=1e-4)
    assert weight_decay_at(37, constant, 100) == pytest.approx(1e-4, abs=1e-15)


# ============================================================================= 5. MAE
def test_random_masking_counts_and_restore():
    n, length = 3, 10
    ids_keep, mask, ids_restore = random_masking(n, length, 0.75, torch.Generator().manual_seed(4))
    keep = 2  # int(10 * 0.25) = int(2.5)
    assert ids_keep.shape == (n, keep) and mask.shape == (n, length)
    assert mask.sum(1).tolist() == [length - keep] * n and set(mask.unique().tolist()) == {0.0, 1.0}
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(4))  # same draw
    for i in range(n):
        kept = set(ids_keep[i].tolist())
        assert kept == set(noise[i].argsort()[:keep].tolist())  # the smallest noise is kept
        assert kept == {j for j in range(length) if mask[i, j] == 0}
        assert sorted(ids_restore[i].tolist()) == list(range(length))
        for j in range(length):  # ids_restore[j] = position of patch j in the shuffled order
            if j in kept:
                assert ids_restore[i, j] < keep and ids_keep[i, ids_restore[i, j]] == j
            else:
                assert ids_restore[i, j] >= keep
    _, mask16, _ = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0))
    assert mask16.sum(1).tolist() == [12.0] * 4
    assert len({tuple(r) for r in mask16.tolist()}) > 1  # per-sample masks
    ids14, mask14, _ = random_masking(2, 14, 0.75)  # 14 * 0.25 = 3.5 truncates to 3 (round would keep 4)
    assert ids14.shape == (2, 3) and mask14.sum(1).tolist() == [11.0, 11.0]


def test_patchify_order():
    c, h, w = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    image = (100 * c + 10 * h + w).unsqueeze(0)  # (1, 3, 4, 4): value = 100 channel + 10 row + column
    top_left = [0, 100, 200, 1, 101, 201, 10, 110, 210, 11, 111, 211]  # (p, q, channel) order
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 12)
    for index, shift in enumerate((0, 2, 20, 22)):  # row of patches first: TL, TR, BL, BR
        assert patches[0, index].tolist() == [v + shift for v in top_left]


def _single_patch_image(values: list[float]) -> torch.Tensor:
    """(1, 3, 2, 2) image whose only 2x2 patch patchifies to ``values`` (p, q, channel order)."""
    image = torch.zeros(1, 3, 2, 2)
    for index, v in enumerate(values):
        p, q, ch = index // 6, (index // 3) % 2, index % 3
        image[0, ch, p, q] = v
    return image


def test_mae_loss_norm_pix_hand():
    image = _single_patch_image(list(range(12)))
    assert patchify(image, 2)[0, 0].tolist() == list(range(12))
    # mean 5.5, unbiased var of 0..11 = 12 * 13 / 12 = 13, squared deviations sum 143: pred 0 gives 143/12/(13+1e-6)
    mask = torch.ones(1, 1)
    assert mae_loss(image, torch.zeros(1, 1, 12), mask, 2, norm_pix=True).item() == \
        pytest.approx(143 / 12 / (13 + 1e-6), abs=1e-6)
    standardised = (torch.arange(12.0) - 5.5) / math.sqrt(13 + 1e-6)
    assert mae_loss(image, standardised.view(1, 1, 12), mask, 2, norm_pix=True).item() == pytest.approx(0, abs=1e-10)
    # without norm_pix the raw pixels are the target: mean of v^2 = 506 / 12
    assert mae_loss(image, torch.zeros(1, 1, 12), mask, 2, norm_pix=False).item() == pytest.approx(506 / 12, abs=1e-4)


def test_mae_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 4, 4, generator=g)  # 4 patches of 12 values each
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # 3 masked patches
    pred = patchify(images, 2).clone()  # perfect prediction: loss 0
    assert mae_loss(images, pred, mask, 2, norm_pix=False).item() == pytest.approx(0, abs=1e-12)
    pred[0, 1] += 10.0  # visible patch: ignored
    pred[1, 3, 5] -= 4.0
    assert mae_loss(images, pred, mask, 2, norm_pix=False).item() == pytest.approx(0, abs=1e-12)
    pred[1, 2, 7] += 3.0  # one value of a masked patch: (3^2 / 12 values) / 3 masked patches = 0.25
    assert mae_loss(images, pred, mask, 2, norm_pix=False).item() == pytest.approx(0.25, abs=1e-6)
    base = mae_loss(images, torch.zeros_like(pred), mask, 2, norm_pix=True).item()
    changed = torch.zeros_like(pred)
    changed[0, 3] = 100.0  # visible under norm_pix too
    assert mae_loss(images, changed, mask, 2, norm_pix=True).item() == pytest.approx(base, abs=1e-6)


def test_sincos_pos_embed_hand_values():
    s1, c1 = math.sin(1.0), math.cos(1.0)
    table = sincos_pos_embed(4, 2)
    # dim 4: omega = [1]; row (h, w) -> [sin w, cos w, sin h, cos h], w varying fastest; row 0 = class token
    expected = [[0, 0, 0, 0], [0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]]
    assert table.shape == (5, 4) and np.allclose(table, expected, atol=1e-6)
    # dim 8: omega = [1, 1/10000^(1/2)] = [1, 0.01]; per axis [sin(p), sin(0.01 p), cos(p), cos(0.01 p)]
    t8 = sincos_pos_embed(8, 2, cls_token=False)
    row = [s1, math.sin(0.01), c1, math.cos(0.01)]
    assert t8.shape == (4, 8) and np.allclose(t8[3], row + row, atol=1e-6)
    assert np.allclose(t8[1], row + [0, 0, 1, 1], atol=1e-6)  # (h=0, w=1)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(6, 2)


def test_mae_uses_fixed_sincos_and_masks_three_quarters():
    from common.backbones import build_backbone
    torch.manual_seed(0)
    vit = build_backbone("vit_small_patch8_224", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    mae = MAE(vit, decoder_dim=8, decoder_depth=1, decoder_heads=2)
    assert torch.allclose(mae.backbone.pos_embed[0], torch.from_numpy(sincos_pos_embed(16, 4)))
    assert not mae.backbone.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    loss, logs = mae([torch.rand(2, 3, 16, 16)], gen=torch.Generator().manual_seed(0))
    assert float(logs["mask_ratio"]) == 0.75 and torch.isfinite(loss)  # 12 of 16 patches per image


# ============================================================================= 6. schedules
def _cfg(**kw) -> SimpleNamespace:
    base = dict(method="simclr", lr=0.3, batch_size=64, accum=1, base_batch_size=256, lr_scaling="linear",
                warmup_epochs=0.0, epochs=4, min_lr=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_peak_lr_linear_and_floor():
    assert peak_lr(_cfg(), 2) == pytest.approx(0.15, abs=1e-15)  # 0.3 * 64 * 2 / 256
    assert peak_lr(_cfg(accum=3), 2) == pytest.approx(0.45, abs=1e-15)
    with pytest.raises(ValueError, match=r"global batch 128 .*below base_batch_size 256"):
        peak_lr(_cfg(lr_scaling="floor"), 2)
    assert peak_lr(_cfg(lr_scaling="floor"), 8) == pytest.approx(0.6, abs=1e-15)  # global 512 = 2 x base
    assert peak_lr(_cfg(lr_scaling="floor", batch_size=100), 7) == pytest.approx(0.6, abs=1e-15)  # 700 // 256 = 2


def test_moco_lr_constant_within_epoch_cosine_by_epoch():
    cfg = _cfg(method="moco", lr=0.03, epochs=4)
    values = [lr_at(s, cfg, 0.06, 5, 20) for s in range(20)]
    for epoch in range(4):
        hand = 0.06 * (1 + math.cos(math.pi * epoch / 4)) / 2
        assert values[5 * epoch:5 * epoch + 5] == pytest.approx([hand] * 5, abs=1e-15)
    assert values[0] == 0.06 and values[10] == pytest.approx(0.03, abs=1e-15)


def test_byol_warmup_starts_from_unscaled_base_lr():
    cfg = _cfg(method="byol", lr=0.45, warmup_epochs=2.0, min_lr=1e-6)
    peak, upe, total = 0.9, 5, 30  # warm-up 10 updates
    assert lr_at(0, cfg, peak, upe, total) == pytest.approx(0.45, abs=1e-15)
    assert lr_at(5, cfg, peak, upe, total) == pytest.approx(0.675, abs=1e-15)
    assert lr_at(10, cfg, peak, upe, total) == pytest.approx(0.9 + 1e-6, abs=1e-15)
    assert lr_at(20, cfg, peak, upe, total) == pytest.approx(0.45 + 1e-6, abs=1e-15)
    assert lr_at(30, cfg, peak, upe, total) == pytest.approx(1e-6, abs=1e-15)
    # the other methods warm up from 0
    simclr = _cfg(method="simclr", warmup_epochs=2.0)
    assert lr_at(0, simclr, peak, upe, total) == 0.0 and lr_at(5, simclr, peak, upe, total) == pytest.approx(0.45)
    # DINO: np.linspace(0, peak, 10) over the 10 warm-up updates, then cosine from the peak
    dino = _cfg(method="dino", warmup_epochs=2.0, min_lr=1e-6)
    hand = np.linspace(0, peak, 10)
    assert [lr_at(s, dino, peak, upe, total) for s in range(10)] == pytest.approx(hand.tolist(), abs=1e-15)
    assert lr_at(10, dino, peak, upe, total) == pytest.approx(0.9, abs=1e-15)
    assert lr_at(20, dino, peak, upe, total) == pytest.approx(1e-6 + (0.9 - 1e-6) / 2, abs=1e-15)


def test_clip_per_parameter_clips_each_tensor_separately():
    big, small, unused = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))
    big.grad = torch.tensor([3.0, 4.0])  # norm 5
    small.grad = torch.tensor([0.3, 0.0, 0.4])  # norm 0.5
    largest = clip_per_parameter([big, small, unused], 1.0)
    assert largest == pytest.approx(5.0)
    assert torch.allclose(big.grad, torch.tensor([0.6, 0.8]), atol=1e-6)  # scaled to norm 1
    assert torch.equal(small.grad, torch.tensor([0.3, 0.0, 0.4]))  # below the clip: untouched
    assert unused.grad is None


# ============================================================================= 7. two processes (gloo)
N_ALL, HALF, TEMP = 8, 4, 0.2


def _dist_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {"z1": torch.randn(N_ALL, 5, generator=g), "z2": torch.randn(N_ALL, 5, generator=g),
            "x1": torch.randn(N_ALL, 6, generator=g), "x2": torch.randn(N_ALL, 6, generator=g),
            "v0": torch.randn(N_ALL, 3, 2, 2, generator=g), "v1": torch.randn(N_ALL, 3, 2, 2, generator=g)}


def _shared_linear() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(6, 5)


def _ssl_dist_worker(ctx, out_dir):
    data, rank = _dist_data(), ctx.rank
    local = slice(rank * HALF, (rank + 1) * HALF)
    # (a) NT-Xent on fixed embeddings, half per process
    z1 = data["z1"][local].clone().requires_grad_(True)
    z2 = data["z2"][local].clone().requires_grad_(True)
    loss_a = nt_xent(z1, z2, TEMP)
    loss_a.backward()
    # (b) gradient of a shared linear layer under DDP
    ddp = nn.parallel.DistributedDataParallel(_shared_linear())
    z = ddp(torch.cat([data["x1"][local], data["x2"][local]]))  # (2n, 5): one forward
    loss_b = nt_xent(z[:HALF], z[HALF:], TEMP)
    loss_b.backward()
    # MoCo: without BN (keys independent of the batch) and with shuffle-BN
    out = {"loss_a": loss_a.detach(), "grad_z1": z1.grad, "grad_z2": z2.grad, "loss_b": loss_b.detach(),
           "grads_b": [p.grad for p in ddp.module.parameters()]}
    for name, bn in (("moco", False), ("moco_bn", True)):
        moco = make_moco(queue_size=10, momentum=0.9, bn=bn)
        moco([data["v0"][local], data["v1"][local]], gen=torch.Generator().manual_seed(5))
        out[name] = {"queue": moco.queue.clone(), "ptr": int(moco.queue_ptr)}
    dist.barrier()
    torch.save(out, f"{out_dir}/r{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ssl_dist")
    run_workers(_ssl_dist_worker, 2, str(out_dir), timeout=120)
    return [torch.load(out_dir / f"r{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_process_nt_xent_uses_negatives_of_both(two_process_results):
    data = _dist_data()
    per_anchor = naive_nt_xent_per_anchor(data["z1"], data["z2"], TEMP)  # the FULL batch, 2N anchors
    z1_full = data["z1"].clone().requires_grad_(True)
    z2_full = data["z2"].clone().requires_grad_(True)
    nt_xent(z1_full, z2_full, TEMP).backward()
    for rank, res in enumerate(two_process_results):
        own = list(range(rank * HALF, (rank + 1) * HALF))
        anchors = [per_anchor[i] for i in own] + [per_anchor[N_ALL + i] for i in own]
        assert res["loss_a"].item() == pytest.approx(sum(anchors) / len(anchors), abs=1e-6)
        half_alone = nt_xent(data["z1"][own], data["z2"][own], TEMP).item()
        assert abs(res["loss_a"].item() - half_alone) > 1e-3  # it did see the other process's negatives
        # gradient through the gather: sum over processes' losses = W x the full-batch mean loss
        assert torch.allclose(res["grad_z1"] / 2, z1_full.grad[own], atol=1e-6)
        assert torch.allclose(res["grad_z2"] / 2, z2_full.grad[own], atol=1e-6)
    mean_loss = (two_process_results[0]["loss_a"] + two_process_results[1]["loss_a"]).item() / 2
    assert mean_loss == pytest.approx(sum(per_anchor) / len(per_anchor), abs=1e-6)


def test_two_process_ddp_gradient_equals_single_process(two_process_results):
    data = _dist_data()
    linear = _shared_linear()
    z = linear(torch.cat([data["x1"], data["x2"]]))  # (2N, 5)
    nt_xent(z[:N_ALL], z[N_ALL:], TEMP).backward()
    reference = [p.grad for p in linear.parameters()]
    for res in two_process_results:
        for got, want in zip(res["grads_b"], reference):
            assert torch.allclose(got, want, atol=1e-5), (got, want)
    half_only = _shared_linear()
    zh = half_only(torch.cat([data["x1"][:HALF], data["x2"][:HALF]]))
    nt_xent(zh[:HALF], zh[HALF:], TEMP).backward()
    assert not torch.allclose(half_only.weight.grad, reference[0], atol=1e-3)  # the test can tell the difference


def test_two_process_moco_queues_identical_with_keys_in_rank_order(two_process_results):
    data = _dist_data()
    r0, r1 = (res["moco"] for res in two_process_results)
    assert r0["ptr"] == r1["ptr"] == N_ALL and torch.equal(r0["queue"], r1["queue"])
    ref = make_moco(queue_size=10, momentum=0.9, bn=False)  # key encoder = query encoder: EMA is the identity
    with torch.no_grad():
        keys = F.normalize(ref.key_head(ref.key_backbone(data["v1"])), dim=1)  # (N, dim), rank 0 then rank 1
    assert torch.allclose(r0["queue"][:, :N_ALL], keys.T, atol=1e-6)
    assert torch.equal(r0["queue"][:, N_ALL:], ref.queue[:, N_ALL:])
    # shuffle-BN: key BN statistics come from the sub-batch rank 0's permutation sends to each process
    b0, b1 = (res["moco_bn"] for res in two_process_results)
    assert b0["ptr"] == b1["ptr"] == N_ALL and torch.equal(b0["queue"], b1["queue"])
    ref_bn = make_moco(queue_size=10, momentum=0.9, bn=True)
    perm = torch.randperm(N_ALL, generator=torch.Generator().manual_seed(5)).view(2, HALF)
    keys_bn = torch.empty(N_ALL, 4)
    with torch.no_grad():
        for rank in range(2):
            keys_bn[perm[rank]] = F.normalize(ref_bn.key_head(ref_bn.key_backbone(data["v1"][perm[rank]])), dim=1)
    assert torch.allclose(b0["queue"][:, :N_ALL], keys_bn.T, atol=1e-6)
