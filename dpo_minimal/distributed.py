"""Data parallel and sharded training: joining the launcher's process group, torch's
DistributedDataParallel around the policy's log-prob pass, this process's place in the run
(`_World`, for metrics and agreement), FSDP sharding for full fine-tuning, and peak memory."""

import hashlib
import os
import resource
import sys

import torch

from .logprobs import DTYPES, _is_fsdp, _is_peft, batch_logps


def init_process_group() -> bool:
    """Join the process group that `torchrun` or `accelerate launch` describe (WORLD_SIZE,
    RANK, MASTER_ADDR in the environment): NCCL for CUDA tensors, gloo for CPU ones.

    Call it in every process before `train` or `shard_fsdp` (the command line does); it does
    nothing alone or when the group is joined already. Returns whether there are several
    processes.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _Policy(torch.nn.Module):
    """The policy's log-prob pass (`batch_logps`) as a module's forward, which is the pass that
    DistributedDataParallel watches to average the gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, dtype: str) -> torch.Tensor:
        return batch_logps(self.model, batch, dtype)


def data_parallel(model, device: torch.device):
    """`model`'s log-prob pass in torch's DistributedDataParallel: rank 0's weights are given
    to every process (each may have drawn its own LoRA init), and the backward pass averages
    the trainable parameters' gradients over the processes in buckets (call it under
    `.no_sync()` for all but the last micro-batch of an accumulated step)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(_Policy(model), device_ids=ids)


class _World:
    """This process's place in a data-parallel run; rank 0 of 1 when it runs alone.

    Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1 in the environment) the process
    group must be joined first (`init_process_group`). Alone, every method returns its input
    untouched, so a one-process run computes exactly what it computed before data parallelism
    existed.
    """

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            raise ValueError(f"this process is one of {os.environ['WORLD_SIZE']} (WORLD_SIZE) "
                             "but has not joined their process group: call dpo_minimal."
                             "distributed.init_process_group() in every process first (the "
                             "command line does).")
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

    def differing(self, text: str) -> list[int]:
        """The ranks whose `text` (compared by a hash) differs from rank 0's."""
        if self.size == 1:
            return []
        value = int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)
        values = self.gather(torch.tensor([value], dtype=torch.int64)).tolist()
        return [rank for rank, v in enumerate(values) if v != values[0]]

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


def shard_fsdp(model, dtype: str = "float32"):
    """Shard a model for full fine-tuning over the processes with FSDP (torch's fully_shard).

    Each decoder block (transformers' `_no_split_modules`) is one shard group and the rest
    (embeddings, final norm, head) the root: every process keeps 1/N of the float32 weights,
    gradients and AdamW state, and gathers one block at a time to compute, in `dtype` (pass
    TrainConfig.dtype: "bfloat16" gathers bfloat16 copies and reduces gradients in float32).
    Joins the process group (`init_process_group`) if needed; call it in every process,
    before `train`. Checkpoints and resuming are not supported under FSDP (save_steps=0).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if _is_peft(model):
        raise ValueError("shard_fsdp shards full fine-tuning; a LoRA model trains data "
                         "parallel without it (its adapters are small).")
    device = next(model.parameters()).device
    init_process_group()
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
