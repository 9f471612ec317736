"""Data parallel and sharded training: this process's place in the run (`_World`), FSDP
sharding for full fine-tuning, and the peak memory each process reports."""

import os
import resource
import sys

import torch

from .logprobs import DTYPES, _is_fsdp, _is_peft


class _World:
    """This process's place in a data-parallel run; rank 0 of 1 when it runs alone.

    Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1 in the environment) the process
    group is joined here unless the caller joined one: gloo for CPU tensors, NCCL for CUDA ones.
    Alone, every method returns its input untouched, so a one-process run computes exactly what
    it computed before data parallelism existed.
    """

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        joined = dist.is_available() and dist.is_initialized()
        self.dist, self.rank = dist, dist.get_rank() if joined else 0
        self.size = dist.get_world_size() if joined else 1
        # NCCL moves CUDA tensors only; gloo moves CPU ones.
        nccl = joined and "nccl" in str(dist.get_backend())
        self.device = device if nccl and device.type == "cuda" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(total)
        return total.tolist()

    def max(self, value: float) -> float:
        if self.size == 1:
            return value
        top = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(top, op=self.dist.ReduceOp.MAX)
        return top.item()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (all of them get the same answer)."""
        return flag if self.size == 1 else self.sum([float(flag)])[0] > 0

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite: all of them stop together, or none does."""
        finite = bool(torch.isfinite(loss))
        return finite if self.size == 1 else self.sum([float(not finite)])[0] == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (one shape everywhere), concatenated along dim 0 by rank."""
        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self.dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    @torch.no_grad()
    def average_gradients(self, params: list) -> None:
        """Replace each gradient by its mean over the processes (flat buckets, few messages).

        Each process's loss is the mean over its own pairs, so the mean of the gradients is the
        gradient of the mean over the global batch: what one process would compute on it all.
        """
        if self.size == 1:
            return
        buckets, size = [[]], 0
        for grad in (p.grad for p in params if p.grad is not None):
            if buckets[-1] and (size + grad.numel() > 2**25 or grad.dtype != buckets[-1][0].dtype):
                buckets, size = buckets + [[]], 0
            buckets[-1].append(grad)
            size += grad.numel()
        for bucket in filter(None, buckets):
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(self.device)
            self.dist.all_reduce(flat)
            flat /= self.size
            for grad, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                grad.copy_(part.view_as(grad))

    @torch.no_grad()
    def broadcast(self, params: list) -> None:
        """Give every process rank 0's values (each may have drawn its own LoRA init)."""
        for p in params if self.size > 1 else ():
            value = p.detach().to(self.device)
            self.dist.broadcast(value, 0)
            p.copy_(value)


def shard_fsdp(model, dtype: str = "float32"):
    """Shard a model for full fine-tuning over the processes with FSDP (torch's fully_shard).

    Each decoder block (transformers' `_no_split_modules`) is one shard group and the rest
    (embeddings, final norm, head) the root: every process keeps 1/N of the float32 weights,
    gradients and AdamW state, and gathers one block at a time to compute, in `dtype` (pass
    TrainConfig.dtype: "bfloat16" gathers bfloat16 copies and reduces gradients in float32).
    Joins the process group (gloo on CPU, NCCL on CUDA) if needed; call it in every process,
    before `train`. Checkpoints and resuming are not supported under FSDP (save_steps=0).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if _is_peft(model):
        raise ValueError("shard_fsdp shards full fine-tuning; a LoRA model trains data "
                         "parallel without it (its adapters are small).")
    device = next(model.parameters()).device
    _World(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_state_dict(model) -> dict | None:
    """The whole state dict of an FSDP-sharded model on rank 0 (CPU), {} elsewhere; None for a
    model that is not sharded (its own state_dict holds it). Every process must call it."""
    if not _is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Process peak RSS: KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
