"""How a model is parallelised, kept apart from what it is (torchtitan's split).

`parallelize` applies, per transformer block: activation checkpointing, `torch.compile`,
then FSDP2 `fully_shard` (bf16 parameters with fp32 gradient reduction when mixed
precision is on); finally the root (embeddings, final norm, head) is sharded too.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: NCCL on GPUs, gloo on CPU. The device is
    this rank's GPU, else the CPU, unless `device` names one ("auto" or None: that default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device in (None, "auto"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized() and (world > 1 or cuda):
        # One GPU process still shards with FSDP2 for bf16 mixed precision, which needs a
        # process group; without torchrun's variables it is a group of one.
        one = {} if "MASTER_ADDR" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, **one)
    return rank, world, device


def use_bf16(tc, device: torch.device) -> bool:
    """The one mixed-precision rule of every job: `mixed_precision` bf16, or auto on a GPU."""
    return tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and device.type == "cuda")


def reshard_after_forward(i: int, last: int, world: int) -> bool:
    """Whether block i frees its gathered parameters after forward. One process holds every
    shard anyway: keeping the bf16 copies saves recasting them in backward. The last block's
    are needed again right away by backward: kept too."""
    return world > 1 and i < last


def parallelize(model: torch.nn.Module, world: int, device: torch.device, *, bf16: bool, act_ckpt: bool,
                compile: bool, keep_gathered: bool = False) -> torch.nn.Module:
    """FSDP2 per block (and activation checkpointing / compile). `keep_gathered` keeps every
    block's parameters gathered after its forward: needed when the loss reaches a block only
    through its recorded routing stats (the aux-router stage: frozen blocks, so no block
    output needs a gradient and FSDP's pre-backward gather never runs)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    for i, block in enumerate(model.layers):
        if act_ckpt:
            block = model.layers[i] = checkpoint_wrapper(block)
        if compile:
            block.compile()  # in place: parameter names stay the same
    if world == 1 and not bf16:
        return model  # one process: FSDP would only add overhead
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        reshard = False if keep_gathered else reshard_after_forward(i, last, world)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
