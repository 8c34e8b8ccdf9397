"""The five self-supervised methods as ``nn.Module``s with one interface.

``method(views, labels=None, epoch=0, gen=None) -> (loss, logs)`` where ``views`` is the list
that :func:`pretrain.views.make_views` returns; ``method.after_update(step, total)`` runs the
momentum / EMA update after each optimizer step; ``method.backbone`` is the network that is
exported and probed (SimCLR encoder, MoCo query encoder, BYOL online encoder, DINO teacher,
MAE encoder), with torchvision / timm key names under the ``backbone.`` prefix.

Heads and hyper-parameters follow the upstream recipes (reference §8):

- SimCLR (simclr-pytorch): fc1 Linear(d, 2048, no bias) - bn1 - ReLU - fc2 Linear(2048, 128, no
  bias) - bn2 (bias frozen); NT-Xent tau 0.1 with negatives from every process.
- MoCo v2: query/key encoders with an MLP head fc = Linear(d, d) - ReLU - Linear(d, 128), key
  encoder momentum 0.999 updated in the forward, queue of 65,536 keys kept identical on every
  process (keys gathered before enqueueing), tau 0.2, shuffle-BN across processes.
- BYOL (PatchTCGA byol_torch.py): projector 2048-4096-256, predictor 256-4096-256 (ln1 - bn - act
  - ln2), symmetric 2 - 2 cos loss, target EMA on parameters only with tau cosine 0.99 -> 1, and
  an optional organ classifier on the detached online features.
- DINO: student / teacher ViT + head Linear-GELU-Linear-GELU-Linear(256) -> L2 norm ->
  weight-normalised Linear(256, 65536, no bias); multi-crop; teacher EMA cosine 0.996 -> 1.
- MAE: ViT encoder on the 25 % visible patches, 8-block 512-d decoder with mask tokens, fixed
  2-D sin-cos position embeddings, normalised-pixel loss on masked patches.
"""
from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.backbones import backbone_dim, build_backbone
from common.optim import cosine_ramp
from pretrain.losses import DINOLoss, byol_loss, mae_loss, nt_xent

METHODS = ("simclr", "moco", "byol", "dino", "mae")


# ============================================================================= shared pieces
@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, on parameters only (BN buffers of
    the target keep their own running statistics, as BYOL / MoCo / DINO upstream)."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("EMA target and online networks differ in structure")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL's MLP with PatchTCGA's layer names: ln1 - bn - act - ln2 (no bias on ln2)."""
    return nn.Sequential(OrderedDict(ln1=nn.Linear(in_dim, hidden), bn=nn.BatchNorm1d(hidden),
                                     act=nn.ReLU(inplace=True), ln2=nn.Linear(hidden, out_dim, bias=False)))


class SSLMethod(nn.Module):
    backbone: nn.Module

    def after_update(self, step: int, total_steps: int) -> dict[str, float]:
        """Called after optimizer update number ``step`` (1-based); returns values to log."""
        return {}

    def after_backward(self, epoch: int) -> None:
        """Called between backward and the optimizer step (e.g. DINO freezes its last layer)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Image features for the k-NN probe: the exported backbone's output."""
        return self.backbone(x)


# ============================================================================= SimCLR
class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, hidden: int = 2048, out_dim: int = 128, temperature: float = 0.1):
        super().__init__()
        d = backbone_dim(backbone)
        self.backbone, self.temperature = backbone, temperature
        self.projection = nn.Sequential(OrderedDict(
            fc1=nn.Linear(d, hidden, bias=False), bn1=nn.BatchNorm1d(hidden), relu=nn.ReLU(inplace=True),
            fc2=nn.Linear(hidden, out_dim, bias=False), bn2=nn.BatchNorm1d(out_dim)))
        self.projection.bn2.bias.requires_grad_(False)  # simclr-pytorch's BatchNorm1dNoBias

    def forward(self, views, labels=None, epoch: int = 0, gen=None):
        n = views[0].shape[0]
        z = self.projection(self.backbone(torch.cat(views[:2])))  # (2n, out_dim); one BN batch
        loss = nt_xent(z[:n], z[n:], self.temperature)
        return loss, {}


# ============================================================================= MoCo v2
class MoCo(SSLMethod):
    def __init__(self, backbone: nn.Module, out_dim: int = 128, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2, hidden: int = 0, shuffle_bn: bool = True):
        super().__init__()
        d = backbone_dim(backbone)
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(d, hidden or d), nn.ReLU(inplace=True), nn.Linear(hidden or d, out_dim))
        self.key_backbone, self.key_head = frozen_copy(self.backbone), frozen_copy(self.head)
        self.momentum, self.temperature, self.shuffle_bn = momentum, temperature, shuffle_bn
        self.register_buffer("queue", F.normalize(torch.randn(out_dim, queue_size), dim=0))  # (dim, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (N, dim) at the pointer, wrapping around the end of the queue."""
        size = self.queue.shape[1]
        if keys.shape[0] > size:
            raise ValueError(f"{keys.shape[0]} keys per step exceed the queue size {size}")
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + keys.shape[0]) % size

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Key embeddings; with several processes the batch is shuffled across them first, so
        BatchNorm statistics of query and key come from different images (shuffle-BN)."""
        world = dist.get_world_size()
        if not (self.shuffle_bn and world > 1):
            return F.normalize(self.key_head(self.key_backbone(x)), dim=1)
        n, rank = x.shape[0], dist.get_rank()
        everyone = dist.all_gather_tensor(x)  # (world * n, ...)
        perm = torch.randperm(world * n, generator=gen).to(x.device) if rank == 0 \
            else torch.empty(world * n, dtype=torch.long, device=x.device)
        torch_dist.broadcast(perm, src=0)
        k = F.normalize(self.key_head(self.key_backbone(everyone[perm.view(world, n)[rank]])), dim=1)
        unshuffle = torch.argsort(perm).view(world, n)[rank]
        return dist.all_gather_tensor(k)[unshuffle]

    def forward(self, views, labels=None, epoch: int = 0, gen=None):
        q = F.normalize(self.head(self.backbone(views[0])), dim=1)  # (n, dim)
        with torch.no_grad():
            ema_update(self.key_backbone, self.backbone, self.momentum)
            ema_update(self.key_head, self.head, self.momentum)
            k = self._keys(views[1], gen)
        q = q.float()
        l_pos = (q * k.float()).sum(1, keepdim=True)  # (n, 1)
        l_neg = q @ self.queue.clone().detach().float()  # (n, K)
        logits = torch.cat([l_pos, l_neg], 1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self.enqueue(dist.all_gather_tensor(k.contiguous()))  # identical on every process
        return loss, {"pos_sim": l_pos.mean().detach()}


# ============================================================================= BYOL
def byol_init_(module: nn.Module) -> None:
    """PatchTCGA's BYOL init: conv/linear weights ~ truncated normal(0, 1/sqrt(fan_in)) in
    [-1, 1], biases 0; BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.trunc_normal_(m.weight, std=1 / math.sqrt(fan_in), a=-1.0, b=1.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BYOL(SSLMethod):
    def __init__(self, backbone: nn.Module, hidden: int = 4096, out_dim: int = 256, base_ema: float = 0.99,
                 num_classes: int = 0):
        super().__init__()
        d = backbone_dim(backbone)
        self.backbone = backbone
        self.projector = mlp(d, hidden, out_dim)
        self.predictor = mlp(out_dim, hidden, out_dim)
        self.classifier = nn.Linear(d, num_classes) if num_classes else None
        byol_init_(self)
        self.target_backbone, self.target_projector = frozen_copy(self.backbone), frozen_copy(self.projector)
        self.base_ema, self.tau = base_ema, base_ema

    def forward(self, views, labels=None, epoch: int = 0, gen=None):
        n = views[0].shape[0]
        x = torch.cat(views[:2])  # (2n, ...)
        h = self.backbone(x)
        p = self.predictor(self.projector(h))
        with torch.no_grad():
            t = self.target_projector(self.target_backbone(x))
        loss = byol_loss(p[:n], t[n:]) + byol_loss(p[n:], t[:n])
        logs = {}
        if self.classifier is not None and labels is not None:
            logits = self.classifier(h[:n].detach())
            probe = F.cross_entropy(logits.float(), labels)
            loss = loss + probe
            logs = {"probe_loss": probe.detach(), "probe_acc": (logits.argmax(1) == labels).float().mean()}
        return loss, logs

    def after_update(self, step: int, total_steps: int) -> dict[str, float]:
        self.tau = cosine_ramp(step, total_steps, self.base_ema, 1.0)
        ema_update(self.target_backbone, self.backbone, self.tau)
        ema_update(self.target_projector, self.projector, self.tau)
        return {"tau": self.tau}


# ============================================================================= DINO
class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g * v / ||v|| per output row; parameters named as
    ``torch.nn.utils.weight_norm`` names them (``weight_g`` (out, 1), ``weight_v`` (out, in))."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def multicrop_forward(backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """Run consecutive crops of equal resolution through the backbone together, then the head on
    all features: (n_crops * B, out_dim), crop-major."""
    feats, start = [], 0
    sizes = [c.shape[-1] for c in crops]
    while start < len(crops):
        end = start
        while end < len(crops) and sizes[end] == sizes[start]:
            end += 1
        feats.append(backbone(torch.cat(crops[start:end])))
        start = end
    return head(torch.cat(feats))


class DINO(SSLMethod):
    """``backbone`` is the teacher (what DINO releases and evaluates); the student is trained."""

    def __init__(self, student: nn.Module, teacher: nn.Module, out_dim: int = 65536, hidden: int = 2048,
                 bottleneck: int = 256, norm_last_layer: bool = True, n_crops: int = 10,
                 base_momentum: float = 0.996, freeze_last_layer: int = 1, **loss_kwargs):
        super().__init__()
        d = backbone_dim(student)
        self.student = student
        self.student_head = DINOHead(d, out_dim, hidden, bottleneck, norm_last_layer)
        self.backbone = teacher
        self.teacher_head = DINOHead(d, out_dim, hidden, bottleneck, norm_last_layer)
        self.backbone.load_state_dict(self.student.state_dict())
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in list(self.backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.loss = DINOLoss(out_dim, n_crops, **loss_kwargs)
        self.base_momentum, self.momentum, self.freeze_last_layer = base_momentum, base_momentum, freeze_last_layer

    def forward(self, views, labels=None, epoch: int = 0, gen=None):
        with torch.no_grad():
            teacher_out = multicrop_forward(self.backbone, self.teacher_head, views[:2])
        student_out = multicrop_forward(self.student, self.student_head, views)
        loss = self.loss(student_out, teacher_out, epoch)
        entropy = self.loss.teacher_entropy
        return loss, {"teacher_entropy": entropy, "kl": loss.detach() - entropy}

    def after_backward(self, epoch: int) -> None:
        if epoch < self.freeze_last_layer:
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    def after_update(self, step: int, total_steps: int) -> dict[str, float]:
        self.momentum = cosine_ramp(step - 1, total_steps, self.base_momentum, 1.0)  # DINO indexes from 0
        ema_update(self.backbone, self.student, self.momentum)
        ema_update(self.teacher_head, self.student_head, self.momentum)
        return {"teacher_momentum": self.momentum}


# ============================================================================= MAE
def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table (grid*grid (+1 zero row for the class token), dim): half
    the channels encode one grid axis, half the other, each as [sin, cos] of pos * omega with
    omega = 1 / 10000^(k / (dim/4)). As MAE, the first half uses ``meshgrid(w, h)[0]``."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(coords, coords), 0).reshape(2, -1)  # (2, grid*grid): w varies fastest in [0]

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(mesh[0]), one_axis(mesh[1])], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return table.astype(np.float32)


def random_masking(n: int, length: int, mask_ratio: float, gen: torch.Generator | None = None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by argsort of uniform noise. Returns ``ids_keep`` (n, keep),
    ``mask`` (n, length) with 1 = removed, and ``ids_restore`` (n, length)."""
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, generator=gen).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :keep], mask, ids_restore


class MAE(SSLMethod):
    def __init__(self, backbone: nn.Module, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block
        if not hasattr(backbone, "patch_embed"):
            raise ValueError("MAE needs a timm ViT backbone (vit_*)")
        self.backbone, self.mask_ratio, self.norm_pix_loss = backbone, mask_ratio, norm_pix_loss
        self.patch = backbone.patch_embed.patch_size[0]
        grid = backbone.patch_embed.grid_size[0]
        dim = backbone.embed_dim
        backbone.pos_embed.requires_grad_(False)  # fixed sin-cos, as MAE
        backbone.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(dim, grid)).unsqueeze(0))
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(sincos_pos_embed(decoder_dim, grid)).unsqueeze(0),
                                              requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True,
                                                    norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch ** 2 * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE init: xavier-uniform Linear (patch projection as a flattened Linear), zero biases,
        LayerNorm 1/0, class and mask tokens ~ N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.backbone.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.backbone.cls_token, std=0.02)
        nn.init.normal_(self.decoder_mask_token, std=0.02)

    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.patch_embed(images) + bb.pos_embed[:, 1:]  # (N, L, D)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (N, keep, D)
        cls = (bb.cls_token + bb.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return bb.norm(bb.blocks(torch.cat([cls, x], 1)))  # (N, 1 + keep, D)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (N, 1 + keep, Dd)
        n, length = ids_restore.shape
        masks = self.decoder_mask_token.expand(n, length + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:], masks], 1)  # (N, L, Dd) in shuffled order
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]  # (N, L, p*p*3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the encoder's patch tokens: MAE is trained without a class-token objective, and
        its fine-tuning recipe pools globally too (the class token probes poorly)."""
        return self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:].mean(1)

    def forward(self, views, labels=None, epoch: int = 0, gen=None):
        images = views[0]
        length = self.backbone.patch_embed.num_patches
        ids_keep, mask, ids_restore = random_masking(images.shape[0], length, self.mask_ratio, gen, images.device)
        pred = self.decode(self.encode(images, ids_keep), ids_restore)
        loss = mae_loss(images, pred, mask, self.patch, self.norm_pix_loss)
        return loss, {"mask_ratio": mask.mean().detach()}


# ============================================================================= factory
def backbone_kwargs(cfg) -> dict:
    """Overrides for a non-standard (demo) backbone: ViT image/patch size and width/depth."""
    if not cfg.arch.startswith("vit_"):
        return {}
    kwargs = {"img_size": cfg.image_size}
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(cfg, f"vit_{key}", 0)
        if value:
            kwargs[key] = value
    return kwargs


def build_method(cfg, num_classes: int = 0) -> SSLMethod:
    """The configured method around a randomly initialised ``cfg.arch`` backbone."""
    kwargs = backbone_kwargs(cfg)
    if cfg.method == "simclr":
        backbone = build_backbone(cfg.arch, **kwargs)
        return SimCLR(backbone, cfg.proj_hidden or backbone_dim(backbone), cfg.proj_dim, cfg.temperature)
    if cfg.method == "moco":
        return MoCo(build_backbone(cfg.arch, **kwargs), cfg.proj_dim, cfg.queue_size, cfg.moco_momentum,
                    cfg.temperature, cfg.proj_hidden, cfg.shuffle_bn)
    if cfg.method == "byol":
        return BYOL(build_backbone(cfg.arch, **kwargs), cfg.proj_hidden, cfg.proj_dim, cfg.ema_start,
                    num_classes if cfg.organ_probe else 0)
    if cfg.method == "dino":
        vit = dict(kwargs, dynamic_img_size=True) if cfg.arch.startswith("vit_") else kwargs
        student = build_backbone(cfg.arch, **vit, **({"drop_path_rate": cfg.drop_path} if "img_size" in vit else {}))
        teacher = build_backbone(cfg.arch, **vit)
        return DINO(student, teacher, cfg.dino_out_dim, cfg.proj_hidden, cfg.proj_dim, cfg.norm_last_layer,
                    2 + cfg.n_local, cfg.ema_start, cfg.freeze_last_layer,
                    warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
                    warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs, student_temp=cfg.temperature,
                    center_momentum=cfg.center_momentum)
    if cfg.method == "mae":
        return MAE(build_backbone(cfg.arch, **kwargs), cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                   cfg.mask_ratio, cfg.norm_pix_loss)
    raise ValueError(f"unknown method {cfg.method!r} (one of {', '.join(METHODS)})")
