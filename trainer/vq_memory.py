"""How much memory `train-vq` will need, before anything large is allocated, and which
settings would fit when it will not: the check `train_vq` makes first (its refusal names
`--batch-size`, `--resolution`, `--channels`; `--no-memory-check` skips it)."""

from __future__ import annotations

import os

import torch

from mmtok.shards import ShardReader
from mmtok.vq import VQConfig, VQModel

# Backward keeps every saved activation and adds the gradients of the largest ones, plus
# the allocator's slack; measured peak RSS / (resident + estimate) on CPU was 0.8-1.1 with
# this factor (tests/test_first_hour_cli.py holds it within 2x).
BACKWARD_FACTOR = 1.3
SHUFFLE_BUFFER = 1000  # encoded images held by `shuffled_images`
# what grows after the estimate: the decoding threads, decoders and allocator arenas (measured)
RUNTIME_OVERHEAD = 256 << 20


def available_memory(device: str) -> int | None:
    """Bytes free for this run: MemAvailable on CPU, free GPU memory on CUDA; None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _encoded_image_bytes(shard_dirs) -> int:
    """Mean bytes of an encoded image in the shards (from the first rows of each index)."""
    sizes = []
    for d in shard_dirs:
        index = ShardReader(d).index()
        if "members" not in index.column_names:
            continue
        for r in index.slice(0, 10_000).select(["group", "members"]).to_pylist():
            if r["group"].startswith(("image-", "pair-")):
                sizes += [m["size"] for m in r["members"] if m["ext"] not in ("json", "txt")]
    return sum(sizes) // len(sizes) if sizes else 0


def memory_estimate(model: VQModel, disc, perceptual, batch_size: int, shard_dirs, device: str) -> dict:
    """Peak memory of training, before anything large is allocated. Activations are measured,
    not guessed: one image at a small resolution goes through the same forward (VQ, perceptual
    network, discriminator) while autograd's saved-tensor hook counts what backward keeps;
    a conv net's activations scale with the pixel count, so that is scaled to the resolution.
    Returns bytes: `per_image` (activations), `fixed` (resident now, optimizer state, shuffle
    buffer), `total`, `needed` (beyond what is resident; on CPU times the processes on this
    machine) and `available`; `where` is cpu or cuda."""
    cfg = model.cfg
    probe = min(cfg.resolution, max(4 * cfg.downsample, 32))  # 32: the discriminator's smallest input
    trainable = [p for m in (model, disc) if m is not None for p in m.parameters()]
    frozen = list(perceptual.parameters()) if perceptual is not None else []
    params = {p.untyped_storage().data_ptr() for p in trainable + frozen}
    saved: dict[int, torch.Tensor] = {}  # by storage: views of one tensor are counted once

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t  # held, so no address is reused while counting
        return t

    x = torch.zeros(1, 3, probe, probe)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        recon = model(x)[0]
        losses = [(recon - x).abs().mean()]
        if perceptual is not None:
            losses.append(perceptual(recon, x))
        if disc is not None:
            losses.append(disc(recon).mean())
    per_image = int(BACKWARD_FACTOR * sum(t.untyped_storage().nbytes() for t in saved.values())
                    * (cfg.resolution / probe) ** 2)
    saved.clear()
    del losses, recon
    param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    buffer = SHUFFLE_BUFFER * _encoded_image_bytes(shard_dirs)
    cuda = device.startswith("cuda")
    processes = 1 if cuda else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks sharing this memory
    if cuda:  # weights, their gradients and Adam's two moments, and the activations live on the GPU
        fixed, resident = 4 * param_bytes + frozen_bytes, 0
    else:  # the weights are resident already; gradients, Adam's moments and the shuffle buffer are not
        fixed, resident = 3 * param_bytes + buffer + RUNTIME_OVERHEAD, _resident_bytes()
    per_process = fixed + batch_size * per_image
    available = available_memory(device)
    return {"per_image": per_image, "fixed": fixed, "total": resident + per_process, "needed": per_process * processes,
            "available": float("inf") if available is None else available, "where": "cuda" if cuda else "cpu",
            "processes": processes}


def fitting_settings(est: dict, cfg: VQConfig, batch_size: int) -> str:
    """Options that would fit in `est`'s available memory, in words."""
    room = est["available"] / est["processes"] - est["fixed"]
    ideas = []
    batch = int(room // est["per_image"]) if room > 0 else 0
    if 1 <= batch < batch_size:
        ideas.append(f"--batch-size {batch}")
    res = cfg.resolution // 2
    while res >= cfg.downsample and res % cfg.downsample == 0:
        if batch_size * est["per_image"] * (res / cfg.resolution) ** 2 <= room:
            ideas.append(f"--resolution {res}")
            break
        res //= 2
    ideas.append("a lower --channels or --res-blocks")
    return "use " + " or ".join(ideas)
