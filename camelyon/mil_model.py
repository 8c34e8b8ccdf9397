"""Attention MIL on tile features: gated-attention ABMIL (Ilse et al. 2018) and CLAM-SB (Lu et al. 2021).

Both follow CLAM's ``models/model_clam.py`` (../shared/reference/foundation-mil.md B1, B2): the bag
``h`` (N, D) goes through Linear(D, 512) + ReLU + Dropout, then gated attention
``A = W_a (tanh(V h) * sigmoid(U h))`` (512 -> 256 -> 1) with a softmax over the N tiles, the
attention-pooled ``M = A h`` (512) and a Linear(512, 2) bag classifier. CLAM-SB adds one
instance classifier Linear(512, 2) per class, trained on the ``k_sample`` most and least attended
tiles of the bag's true class (pseudo labels 1 and 0); ``total = bag_weight * CE(bag) +
(1 - bag_weight) * instance loss``. Dropout 0.25 on both attention branches when ``dropout`` is
set, as CLAM does (a fixed p used as a flag).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedAttention(nn.Module):
    """CLAM's ``Attn_Net_Gated``: (N, L) -> unnormalised attention logits (N,)."""

    def __init__(self, dim: int, hidden: int, dropout: bool = False):
        super().__init__()
        p = 0.25 if dropout else 0.0
        self.tanh_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(p))
        self.sigmoid_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(p))
        self.score = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(self.tanh_branch(h) * self.sigmoid_branch(h)).squeeze(-1)


class AttentionMIL(nn.Module):
    """Gated-attention MIL over one bag: ``forward(h (N, D)) -> {"logits": (2,), "attention": (N,),
    "h": (N, 512)}``; the attention is softmax-normalised (sums to 1) and does not depend on the
    order of the tiles. ``AttentionMIL`` alone is ABMIL; :class:`CLAMSB` adds the instance branch."""

    def __init__(self, in_dim: int, hidden: tuple[int, int] = (512, 256), dropout: float = 0.25, n_classes: int = 2):
        super().__init__()
        fc, att = hidden
        self.in_dim, self.n_classes = in_dim, n_classes
        self.fc = nn.Sequential(nn.Linear(in_dim, fc), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(fc, att, dropout=dropout > 0)
        self.classifier = nn.Linear(fc, n_classes)

    def forward(self, features: torch.Tensor, label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """With ``label`` (a 0-d long tensor) the output also holds ``loss`` (what training
        minimises) and ``bag_loss`` (what early stopping watches); computed inside ``forward`` so
        DistributedDataParallel sees every parameter the loss uses."""
        h = self.fc(features)  # (N, 512)
        attention = torch.softmax(self.attention(h), dim=0)  # (N,)
        pooled = attention @ h  # (512,)
        out = {"logits": self.classifier(pooled), "attention": attention, "h": h}
        if label is not None:
            out.update(self.loss(out, label))
        return out

    def loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
        bag = F.cross_entropy(out["logits"].float()[None], label.view(1))
        return {"loss": bag, "bag_loss": bag}


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 multiclass SVM (Berrada et al. 2018; smooth-topk ``SmoothTop1SVM``, CLAM's
    ``--inst_loss svm``): mean over rows of ``tau * logsumexp((x + alpha [j != y] - x_y) / tau)``."""
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))  # (n, C)
    x_y = logits.gather(1, target[:, None])  # (n, 1)
    return (tau * torch.logsumexp((logits + margin - x_y) / tau, dim=1)).mean()


class CLAMSB(AttentionMIL):
    """CLAM single-branch: :class:`AttentionMIL` plus one instance classifier per class."""

    def __init__(self, in_dim: int, hidden: tuple[int, int] = (512, 256), dropout: float = 0.25, n_classes: int = 2,
                 k_sample: int = 8, bag_weight: float = 0.7, inst_loss: str = "svm"):
        super().__init__(in_dim, hidden, dropout, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden[0], 2) for _ in range(n_classes))
        self.k_sample, self.bag_weight, self.inst_loss = k_sample, bag_weight, inst_loss

    def instance_loss(self, attention: torch.Tensor, h: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM's ``inst_eval`` for the bag's true class: its top-k attended tiles are pseudo-positive,
        its bottom-k pseudo-negative (k = min(k_sample, N // 2), so small bags still work)."""
        k = min(self.k_sample, attention.numel() // 2)
        if k < 1:
            return attention.new_zeros(())
        top = torch.topk(attention, k).indices
        bottom = torch.topk(-attention, k).indices
        x = h[torch.cat([top, bottom])]  # (2k, 512)
        target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
        logits = self.instance_classifiers[label](x).float()
        if self.inst_loss == "svm":
            return smooth_top1_svm(logits, target)
        return F.cross_entropy(logits, target)

    def loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
        bag = super().loss(out, label)["bag_loss"]
        inst = self.instance_loss(out["attention"], out["h"], int(label))
        return {"loss": self.bag_weight * bag + (1 - self.bag_weight) * inst, "bag_loss": bag, "instance_loss": inst}


def build_mil_model(kind: str, in_dim: int, hidden=(512, 256), dropout: float = 0.25, k_sample: int = 8,
                    bag_weight: float = 0.7, inst_loss: str = "svm") -> AttentionMIL:
    """``abmil`` or ``clam_sb`` for features of width ``in_dim``."""
    if kind == "abmil":
        return AttentionMIL(in_dim, tuple(hidden), dropout)
    if kind == "clam_sb":
        return CLAMSB(in_dim, tuple(hidden), dropout, k_sample=k_sample, bag_weight=bag_weight, inst_loss=inst_loss)
    raise ValueError(f"unknown MIL model {kind!r} (abmil | clam_sb)")
