"""Process-group set-up and the few collective helpers every training script needs.

One entry point, :func:`launch`, covers the three ways a job starts:

(a) ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment): one process is
    already running per device; initialise from the environment.
(b) a host list in the config (PatchTCGA style): the same command runs on every node; this
    node's rank is the position of its host name in ``cfg.hosts`` (or ``cfg.node_rank``), and
    one process per local GPU (``cfg.gpus_per_node`` processes on CPU) is started with
    ``torch.multiprocessing``. Global rank = node_rank * procs_per_node + local_rank.
(c) nothing: a single process, no process group.

NCCL on CUDA, gloo on CPU. Rank-0 guards, barriers and exact reductions (sum counts, never
average averages) work in every mode, so training code calls them unconditionally.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DistributedSampler

from common.config import ConfigError
from common.errors import USER_ERRORS, UserError, describe, traceback_requested


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------- queries
def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only (the built-in print is never replaced)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


# ----------------------------------------------------------------------------- set-up
def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: str = "auto") -> DistContext:
    """Initialise from torchrun's environment if present, else return a single-process context."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = resolve_device(device, local_rank)
        if not is_initialized():
            torch_dist.init_process_group(backend=_backend_for(dev), init_method="env://",
                                          rank=rank, world_size=world,
                                          timeout=datetime.timedelta(minutes=30))
        return DistContext(rank, world, local_rank, dev)
    return DistContext(0, 1, 0, resolve_device(device, 0))


def cleanup() -> None:
    """Tear the process group down after every process has arrived here: destroying it while a
    peer still talks to it can abort that peer (gloo: "terminate called without an active
    exception")."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def _procs_per_node(cfg) -> int:
    if cfg.gpus_per_node > 0:
        return cfg.gpus_per_node
    wants_cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    return torch.cuda.device_count() if wants_cuda else 1


def node_rank_from_hosts(hosts: list[str], node_rank: int = -1) -> int:
    """This machine's index in ``hosts`` (matched by host name or fully qualified name)."""
    if node_rank >= 0:
        if node_rank >= len(hosts):
            raise ConfigError(f"node_rank {node_rank} is outside the host list {hosts}")
        return node_rank
    names = {socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0]}
    for i, host in enumerate(hosts):
        if host in names:
            return i
    raise ConfigError(f"this machine ({socket.gethostname()}) is not in the configured hosts {hosts}; "
                      "add it, or pass --node-rank")


def _host_list_worker(local_rank: int, main: Callable, cfg, node_rank: int, nprocs: int, user_errors) -> None:
    """One spawned process. A user error is handed to the parent through ``user_errors`` (the
    parent reports it as one line) and ends this process with status 2, without a traceback."""
    world = len(cfg.hosts) * nprocs
    os.environ.update(RANK=str(node_rank * nprocs + local_rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR=cfg.master_addr, MASTER_PORT=str(cfg.master_port))
    try:
        main(cfg)
    except USER_ERRORS as err:
        if traceback_requested():
            raise
        user_errors.put(describe(err))
        raise SystemExit(2) from None


def launch(main: Callable[[Any], Any], cfg) -> Any:
    """Run ``main(cfg)`` in every process of the job (see module docstring for the three modes).

    ``main`` calls :func:`setup` itself, which finds the environment this function prepared.
    A user error (:mod:`common.errors`) in a spawned process is raised here as a
    :class:`common.errors.UserError` with the same message, so the ``__main__`` block's
    ``exit_on_user_error`` reports it as one line with exit status 2 in every mode.
    """
    in_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if in_torchrun or not cfg.hosts:
        return main(cfg)
    node = node_rank_from_hosts(list(cfg.hosts), cfg.node_rank)
    nprocs = _procs_per_node(cfg)
    user_errors = torch.multiprocessing.get_context("spawn").SimpleQueue()
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # not "Terminating process ...": the failure itself is reported
    try:
        torch.multiprocessing.spawn(_host_list_worker, args=(main, cfg, node, nprocs, user_errors), nprocs=nprocs,
                                    join=True)
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException):
        if not user_errors.empty():  # a user error explains the failure of every process
            raise UserError(user_errors.get()) from None
        raise
    finally:
        spawn_log.setLevel(level)
    return None


# ----------------------------------------------------------------------------- seeding
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (call with ``seed + rank``); optional determinism switch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def worker_init_fn(worker_id: int) -> None:
    """Give each data-loader worker distinct, reproducible numpy/python seeds."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- reductions
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes, in place; returns it. Use for counts and sums, not means."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def reduce_sums(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum a dict of scalars (counts, summed losses) across processes exactly (float64)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every process (list ordered by rank)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all processes along dim 0 (no gradient)."""
    if not is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over processes and returns this
    process's slice, so a loss computed on the gathered tensor back-propagates into every
    process's inputs (SimCLR's negatives from other processes)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.n = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        start = get_rank() * ctx.n
        return grad[start:start + ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all processes along dim 0, differentiably.

    With DDP averaging the parameter gradients, the gradient of ``mean_r loss_r`` equals the
    single-process gradient of the loss on the whole global batch."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only (data generation, packing, downloads) while the others wait.

    Returns ``fn``'s result on rank 0 and None elsewhere. If ``fn`` raises, rank 0 re-raises it
    and every other process raises a RuntimeError quoting it (a :class:`common.errors.UserError`
    with the same message when it is a user error), so a bad input found by rank 0 stops the whole
    job at once instead of leaving the other processes at a barrier."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # reported to every process below, re-raised here
            error = err
    report = None  # (is a user error, message)
    if isinstance(error, USER_ERRORS):
        report = (True, describe(error))
    elif error is not None:
        report = (False, f"{type(error).__name__}: {error}")
    report = broadcast_object(report)
    if error is not None:
        raise error
    if report is not None:
        is_user_error, message = report
        if is_user_error:  # the same one-line message on every process
            raise UserError(message)
        raise RuntimeError(f"rank 0 failed, stopping this process too: {message}")
    return result


# ----------------------------------------------------------------------------- sampling
class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way: ``set_epoch(epoch, skip=n)`` drops the
    first ``n`` indices of this rank's share, so a run resumed mid-epoch sees exactly the batches
    an uninterrupted run would (the order depends only on seed and epoch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


def make_sampler(dataset, shuffle: bool, seed: int = 0, drop_last: bool = False) -> ResumableSampler:
    """A (resumable) DistributedSampler in every mode (1 replica when single-process).

    Its order depends only on (seed, epoch). Call ``sampler.set_epoch(epoch, skip)`` at the start
    of each epoch, ``skip`` = samples of this rank already consumed (mid-epoch resume)."""
    return ResumableSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                            shuffle=shuffle, seed=seed, drop_last=drop_last)


def padded_count_warning(dataset_len: int, sampler: DistributedSampler) -> str | None:
    """Message when DistributedSampler padding duplicates samples in evaluation."""
    total = len(sampler) * sampler.num_replicas
    if total != dataset_len:
        return (f"distributed sampler pads {dataset_len} samples to {total}: "
                f"{total - dataset_len} duplicates enter the metric")
    return None


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank r takes indices r, r + W, r + 2W, ... with no padding,
    so summed counts over processes cover every sample exactly once."""

    def __init__(self, dataset_len: int, rank: int | None = None, world_size: int | None = None):
        self.indices = list(range(get_rank() if rank is None else rank, dataset_len,
                                  get_world_size() if world_size is None else world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
