"""`train-vq`: train the VQ image tokenizer on the images in shard directories.

One process on CPU or one GPU; under torchrun (WORLD_SIZE > 1) each rank reads its share
of the images and gradients are averaged with DistributedDataParallel. Every
`--checkpoint-every` steps the full training state (model, discriminator, optimizers,
restart RNG, step) goes to `vq_ckpt.safetensors` + `vq_ckpt.json` in the output
directory; a later run with the same options resumes from it automatically. The image
stream is a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mmtok import runner
from mmtok.shards import ShardReader, atomic_write
from mmtok.tokenizer import image_alone
from mmtok.trainer.checkpoint import truncate_jsonl
from mmtok.vocab import VOCAB_FILE, Vocab
from mmtok.vq import PatchDiscriminator, PerceptualLoss, VQConfig, VQModel, load_image, to_unit

CKPT = "vq_ckpt.safetensors"
CKPT_META = "vq_ckpt.json"
LOG = "vq_log.jsonl"


def iter_images(shard_dirs: list[str | Path]) -> Iterator[tuple[str, bytes]]:
    """(name, encoded image) for every image and image-caption pair in the directories."""
    for d in shard_dirs:
        reader = ShardReader(d)
        for s in reader:
            image = image_alone(s.members)
            if image is not None:
                yield f"{d}/{s.shard}:{s.key}", next(iter(image.values()))


def shuffled_images(shard_dirs, seed: int, rank: int = 0, world: int = 1, buffer: int = 1000) -> Iterator[tuple[str, bytes]]:
    """Endless (name, bytes): epochs through a seeded shuffle buffer; rank r keeps the images
    at positions r, r + world, ..."""
    epoch = 0
    while True:
        rng = random.Random(f"{seed}:{epoch}")
        pool, mine = [], 0
        for pos, entry in enumerate(iter_images(shard_dirs)):
            if pos % world != rank:
                continue
            mine += 1
            pool.append(entry)
            if len(pool) >= buffer:
                i = rng.randrange(len(pool))
                pool[i], pool[-1] = pool[-1], pool[i]
                yield pool.pop()
        if not mine:
            raise ValueError(f"no images for rank {rank} of {world} in {', '.join(map(str, shard_dirs))}: "
                             "train-vq needs image or pair samples (at least one per rank)")
        rng.shuffle(pool)
        yield from pool
        epoch += 1


class Batches:
    """Decoded uint8 batches [batch, 3, R, R] from the image stream, decoded by a thread pool (PIL
    releases the GIL) in stream order. `consumed` counts the stream entries taken (bad
    ones too), so a resumed run skips exactly those without decoding."""

    def __init__(self, entries: Iterator, batch: int, resolution: int, skip: int = 0, threads: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.entries, self.batch, self.resolution = entries, batch, resolution
        self.consumed, self.bad = skip, {}
        self.pool = ThreadPoolExecutor(threads)
        for _ in range(skip):
            next(self.entries)

    def _load(self, entry):
        name, data = entry
        try:
            return load_image(data, self.resolution)
        except Exception as e:  # any decoder failure: skip that image, keep training
            self.bad[name] = f"{type(e).__name__}: {e}"
            return None

    def __next__(self) -> torch.Tensor:
        images, tried = [], 0
        while len(images) < self.batch:
            entries = [next(self.entries) for _ in range(self.batch - len(images))]
            self.consumed += len(entries)
            images += [x for x in self.pool.map(self._load, entries) if x is not None]
            tried += len(entries)
            if not images and tried >= 1000:
                raise ValueError(f"{tried} images in a row do not decode, e.g. {next(iter(self.bad.items()))}")
        return torch.from_numpy(np.stack(images))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image (Gaussian window 11, sigma 1.5, on [0, 1] images)."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    size = min(11, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(size, dtype=torch.float32) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).to(x.device).expand(x.shape[1], 1, size, size)

    def blur(t):
        return F.conv2d(t, w, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict) -> dict:
    """Optimizer state as flat tensors (for safetensors) plus its JSON-able rest."""
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, t in st.items():
            tensors[f"{prefix}.{pid}.{name}"] = torch.as_tensor(t).detach().cpu().contiguous()
    return {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(prefix: str, meta: dict, tensors: dict) -> dict:
    state: dict = {}
    for k, t in tensors.items():
        if k.startswith(prefix + "."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def train_vq(shard_dirs: list[str | Path], out: str | Path, cfg: VQConfig, *, steps: int, batch_size: int = 8,
             lr: float = 1e-4, log_every: int = 100, checkpoint_every: int = 1000, restart_every: int = 100,
             disc_weight: float = 0.1, disc_start: int = 10_000, perceptual_weights: str | None = None,
             perceptual_weight: float = 1.0, seed: int = 0, device: str | None = None, restart: bool = False,
             memory_check: bool = True, progress: bool = False, log=print) -> dict:
    """Train (or resume) and write vq.safetensors + vq.json into `out`; returns the last metrics.
    Refuses (ValueError, naming settings that fit) when the memory estimate exceeds what the
    device has available, unless `memory_check` is off."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / VOCAB_FILE).exists():
        vocab = Vocab.load(out)
        if vocab.text_tokenizer:  # an imported tokenizer (mmtok import-tokenizer): its VQ is not replaced
            raise ValueError(f"{out} holds an imported tokenizer; train into another --out")
        if vocab.n_image_codes != cfg.codebook_size:
            raise ValueError(f"{out}/{VOCAB_FILE} reserves {vocab.n_image_codes} image codes but --codebook-size is "
                             f"{cfg.codebook_size}; use --codebook-size {vocab.n_image_codes} or another --out")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if device is None or device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)

    run = {"model": cfg.to_dict(), "batch_size": batch_size, "lr": lr, "restart_every": restart_every,
           "disc_weight": disc_weight, "disc_start": disc_start, "perceptual_weights": perceptual_weights,
           "perceptual_weight": perceptual_weight, "seed": seed, "world_size": world,
           "inputs": [str(d) for d in shard_dirs]}
    torch.manual_seed(seed)
    model = VQModel(cfg)
    disc = PatchDiscriminator() if disc_weight > 0 else None
    perceptual = PerceptualLoss(perceptual_weights) if perceptual_weights else None
    # before anything large is allocated: a run that cannot fit is refused, not killed by the kernel
    est = memory_estimate(model, disc if steps > disc_start else None, perceptual, batch_size, shard_dirs, device)
    if rank == 0:
        log(f"train-vq: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {cfg.resolution} px, "
            f"batch {batch_size}, {steps} steps on {device}; estimated peak memory {est['total'] / 2**30:.1f} GiB "
            f"per process, {est['available'] / 2**30:.1f} GiB available (lower with --batch-size or --resolution)")
    if memory_check and est["needed"] > est["available"]:
        raise ValueError(f"train-vq would need about {est['needed'] / 2**30:.1f} GiB of {est['where']} memory (estimate) but "
                         f"{est['available'] / 2**30:.1f} GiB is available; {fitting_settings(est, cfg, batch_size)}, "
                         "or pass --no-memory-check to try anyway")
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    model.to(device)
    disc = disc.to(device) if disc is not None else None
    perceptual = perceptual.to(device) if perceptual is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if disc else None
    gen = torch.Generator().manual_seed(seed + 1)

    window_counts = torch.zeros(cfg.codebook_size, dtype=torch.long, device=device)
    step, consumed = 0, 0
    if (out / CKPT_META).exists() and not restart:
        step, consumed = _load_checkpoint(out, run, model, disc, opt, opt_d, gen, window_counts)
        log(f"resuming from {out / CKPT} at step {step}")
    log_path = out / LOG
    if rank == 0:
        truncate_jsonl(log_path, step)

    ddp_model, ddp_disc = model, disc
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        ddp_model = DDP(model, device_ids=ids)
        ddp_disc = DDP(disc, device_ids=ids) if disc else None

    batches = Batches(shuffled_images(shard_dirs, seed, rank, world), batch_size, cfg.resolution, skip=consumed,
                      threads=min(8, os.cpu_count() or 1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    def fresh() -> dict:
        return {"n": 0, "sums": torch.zeros(3, device=device), "counts": torch.zeros_like(window_counts)}

    interval, metrics = fresh(), {}
    t0 = time.perf_counter()
    with runner.progress_bar("train-vq", steps, step, progress and rank == 0) as bar:
        while step < steps:
            x = to_unit(next(batches).to(device, non_blocking=True))
            use_disc = disc is not None and step >= disc_start
            with autocast:
                recon, idx, qloss, z = ddp_model(x)
                rec_loss = (recon.float() - x).abs().mean()
                loss = rec_loss + qloss
                if perceptual is not None:
                    loss = loss + perceptual_weight * perceptual(recon.float(), x)
                if use_disc:
                    loss = loss - disc_weight * ddp_disc(recon).float().mean()  # hinge generator loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_disc:
                with autocast:  # real and fake in one forward (one DDP reduction)
                    real, fake = ddp_disc(torch.cat([x, recon.detach()])).float().chunk(2)
                    d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            step += 1
            bar.advance()

            with torch.no_grad():
                counts = torch.bincount(idx.flatten(), minlength=cfg.codebook_size)
                window_counts += counts
                interval["counts"] += counts
                interval["n"] += 1
                # summed on the device: no host sync per step
                interval["sums"] += torch.stack([rec_loss.detach().float(), psnr(recon, x).mean(), ssim(recon, x).mean()])
                if step % restart_every == 0:
                    _restart_dead(model, window_counts, z, gen, distributed)
                    window_counts.zero_()

            if step % log_every == 0 or step == steps:
                metrics = _interval_metrics(interval, step, distributed)
                metrics["disc"] = use_disc
                metrics["images_per_s"] = round(interval["n"] * batch_size * world / (time.perf_counter() - t0), 2)
                if rank == 0:
                    log(f"step {step}: recon {metrics['recon']:.4f}  PSNR {metrics['psnr']:.2f} dB  "
                        f"SSIM {metrics['ssim']:.3f}  codes used {metrics['usage']:.1%}  perplexity {metrics['perplexity']:.1f}")
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(metrics, sort_keys=True) + "\n")
                interval = fresh()
                t0 = time.perf_counter()
            if step % checkpoint_every == 0 or step == steps:
                if distributed:  # the checkpoint keeps the global counts: gather them onto rank 0
                    import torch.distributed as dist

                    dist.all_reduce(window_counts)
                    if rank != 0:
                        window_counts.zero_()
                if rank == 0:
                    _save_checkpoint(out, run, step, batches.consumed, model, disc, opt, opt_d, gen, window_counts)

    if rank == 0:
        model.eval().save(out)
        if (out / VOCAB_FILE).exists():
            vocab = Vocab.load(out)
            vocab.image_tokens_per_image = cfg.tokens_per_image
            vocab.save(out)
    if batches.bad and rank == 0:
        name, reason = next(iter(batches.bad.items()))
        log(f"skipped {len(batches.bad)} images that do not decode, e.g. {name}: {reason}")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {**metrics, "step": step, "skipped_images": len(batches.bad), "out": str(out),
            "memory_estimate_bytes": est["total"]}


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


def _interval_metrics(interval: dict, step: int, distributed: bool) -> dict:
    sums = torch.cat([interval["sums"].double(), torch.tensor([interval["n"]], dtype=torch.float64, device=interval["sums"].device)])
    counts = interval["counts"].clone()
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(counts)
    sums = sums.cpu()
    n = max(sums[3].item(), 1)
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"step": step, "recon": sums[0].item() / n, "psnr": sums[1].item() / n, "ssim": sums[2].item() / n,
            "usage": (counts > 0).float().mean().item(), "perplexity": math.exp(entropy)}


@torch.no_grad()
def _restart_dead(model: VQModel, window_counts: torch.Tensor, z: torch.Tensor, gen: torch.Generator,
                  distributed: bool) -> None:
    """Codes unused for a whole window move onto current encoder outputs. Under DDP the
    counts are summed over ranks and rank 0's new codebook is broadcast."""
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(window_counts)
        model.quantizer.restart(window_counts == 0, z, gen)
        dist.broadcast(model.quantizer.codebook.data, 0)
    else:
        model.quantizer.restart(window_counts == 0, z, gen)


def _save_checkpoint(out: Path, run: dict, step: int, consumed: int, model, disc, opt, opt_d, gen,
                     window_counts: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"step": step, "consumed": consumed, "run": run, "opt": _flatten_optimizer("opt", opt, tensors)}
    if disc is not None:
        tensors.update({f"disc.{k}": v.detach().cpu().contiguous() for k, v in disc.state_dict().items()})
        meta["opt_d"] = _flatten_optimizer("opt_d", opt_d, tensors)
    tensors["rng"] = gen.get_state()
    tensors["window_counts"] = window_counts.cpu()  # dead-code restarts depend on the partial window
    tmp = out / f".{CKPT}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / CKPT)  # weights first, then the metadata that points at them
    atomic_write(out / CKPT_META, json.dumps(meta, sort_keys=True, indent=1).encode())


def _load_checkpoint(out: Path, run: dict, model, disc, opt, opt_d, gen, window_counts) -> tuple[int, int]:
    from safetensors.torch import load_file

    meta = json.loads((out / CKPT_META).read_text())
    if meta["run"] != run:
        diff = sorted(k for k in run if meta["run"].get(k) != run[k])
        raise ValueError(f"{out} holds a train-vq checkpoint with other options ({', '.join(diff)}); "
                         "rerun with the same options to resume, or pass --restart to start again")
    tensors = load_file(str(out / CKPT))
    dev = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict(_unflatten_optimizer("opt", meta["opt"], tensors))
    if disc is not None:
        disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        opt_d.load_state_dict(_unflatten_optimizer("opt_d", meta["opt_d"], tensors))
    gen.set_state(tensors["rng"])
    window_counts.copy_(tensors["window_counts"])
    model.to(dev)
    return int(meta["step"]), int(meta["consumed"])

