"""Self-supervised objectives, each as in its upstream repository (reference §8).

- :func:`nt_xent` — SimCLR's NT-Xent over 2 views with negatives from every process.
- :func:`byol_loss` — BYOL's 2 - 2 cos(p, z).
- :class:`DINOLoss` — DINO's cross-entropy between sharpened, centred teacher and student
  distributions over all crop pairs (teacher temperature warm-up, centre EMA).
- :func:`mae_loss` — MAE's (normalised-)pixel MSE on masked patches only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020) for two views z1, z2 (n, d) of this process's n images.

    The embeddings of all processes are gathered differentiably, giving 2N candidates for each of
    this process's 2n anchors: its other view is the positive, the 2N - 2 others are negatives,
    itself is excluded. Returns the mean over local anchors; averaged over processes (DDP) this
    is the loss and gradient of the whole global batch in one process."""
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    all1, all2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)  # (N, d) each
    big_n = all1.shape[0]
    candidates = torch.cat([all1, all2])  # (2N, d): view 1 of every image, then view 2
    offset = dist.get_rank() * n if big_n > n else 0
    own = torch.arange(n, device=z1.device) + offset  # global index of this process's images
    anchors = torch.cat([z1, z2])  # (2n, d)
    logits = anchors @ candidates.T / temperature  # (2n, 2N)
    self_index = torch.cat([own, own + big_n])
    positive = torch.cat([own + big_n, own])
    logits[torch.arange(2 * n, device=z1.device), self_index] = float("-inf")
    return F.cross_entropy(logits, positive)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), mean over the batch (z is the target projection, no gradient)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """DINO: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs`` epochs
    (np.linspace inclusive of both ends, indexed by epoch), then ``temp``."""
    if epoch < warmup_epochs:
        return warmup_temp if warmup_epochs == 1 else warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)
    return temp


class DINOLoss(nn.Module):
    """DINO's loss: for every (teacher global crop, student crop) pair of different crops,
    H(softmax((t - c) / tau_t), log_softmax(s / tau_s)), averaged over the pairs; the centre c
    is an EMA (momentum 0.9) of the teacher outputs' batch mean over all processes."""

    def __init__(self, out_dim: int, n_crops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """student_out (n_crops * B, K), teacher_out (2 * B, K), crops stacked crop-major."""
        student = (student_out.float() / self.student_temp).chunk(self.n_crops)
        t_temp = teacher_temperature(epoch, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)
        teacher = F.softmax((teacher_out.float() - self.center) / t_temp, dim=-1).detach().chunk(2)
        # mean entropy of the teacher targets: the loss is >= it, so loss - entropy (the KL) is
        # what training drives down even while the teacher itself becomes less peaked
        self.teacher_entropy = torch.stack([-(q * torch.log(q.clamp_min(1e-12))).sum(-1).mean() for q in teacher]).mean()
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue  # same crop seen by both
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = dist.all_reduce_sum(teacher_out.float().sum(dim=0, keepdim=True))
        batch_center = batch_center / (len(teacher_out) * dist.get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, patch*patch*3), MAE's order (row of patches, then p, q, channel)."""
    n, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(n, c, gh, patch, gw, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch * patch * c)


def mae_loss(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int,
             norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only (mask 1 = removed).
    With ``norm_pix`` each target patch is standardised by its own mean and variance
    (unbiased, + 1e-6), as MAE's pretraining recipe."""
    target = patchify(images.float(), patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()
