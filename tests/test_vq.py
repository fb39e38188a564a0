import io
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from mmtok.vocab import Vocab
from mmtok.vq import PerceptualLoss, Quantizer, VQConfig, VQModel, load_image, to_unit
from mmtok.trainer.checkpoint import intact_checkpoint
from mmtok.trainer.vq_train import LOG, OLD_CHECKPOINT, psnr, ssim, train_vq
from helpers.media import bomb_png, draw_image, make_shards, old_load_image, photo
from helpers.tensors import moved

TINY = dict(resolution=16, downsample=2, codebook_size=64, code_dim=8, channels=16, res_blocks=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_alpha_resize_crop():
    clear = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent red -> white
    x = load_image(png(clear), 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.uint8
    assert (x == 255).all()
    half = Image.new("RGB", (60, 20), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 30, 20))  # left white, right black: centre crop keeps both
    x = to_unit(torch.from_numpy(load_image(png(half), 16)))
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.allclose(x[:, :, 0], torch.tensor(1.0)) and torch.allclose(x[:, :, -1], torch.tensor(-1.0))
    with pytest.raises(Exception):
        load_image(b"not an image", 16)


def unit(pixels: np.ndarray) -> np.ndarray:
    return to_unit(torch.from_numpy(pixels)).numpy()


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(torch.from_numpy(a)[None], torch.from_numpy(b)[None]).item()


def test_sources_under_twice_the_resolution_take_the_exact_old_path():
    def encode(img, fmt):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"transparency": 0} if fmt == "GIF" else {}))
        return buf.getvalue()

    rgb = Image.open(io.BytesIO(photo(1, 62, 40, "PNG")))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    sources = [encode(rgb, "JPEG"), encode(rgb.resize((40, 31)), "JPEG"), encode(rgba, "PNG"),
               encode(rgb.convert("L"), "JPEG"), encode(rgb.convert("P"), "GIF"), encode(rgb.resize((12, 9)), "PNG")]
    for data in sources:  # short sides 40, 31, 40, 40, 40, 9: all under 2 x 21
        new = load_image(data, 21)
        assert new.dtype == np.uint8 and new.shape == (3, 21, 21)
        assert np.array_equal(unit(new), old_load_image(data, 21))  # bit-identical after scaling


def test_big_sources_decode_at_reduced_size_close_to_the_full_decode():
    """The PSNR bound recorded in docs/TOKENIZERS.md (photo-like sources: 47 dB and up)."""
    for data, resolutions in ((photo(2, 1024, 768), (128, 96)), (photo(3, 2048, 1536), (256,))):
        for res in resolutions:  # JPEG drafts at 1/2, 1/4 and 1/2: never below twice the target
            new, old = unit(load_image(data, res)), old_load_image(data, res)
            assert 40 < image_psnr(new, old) < 80, (res, image_psnr(new, old))  # close, but not the old path
    data = photo(4, 768, 576, "PNG")  # 9x: Pillow box-reduces by 3 first (reducing_gap)
    new, old = unit(load_image(data, 64)), old_load_image(data, 64)
    assert 45 < image_psnr(new, old) < 80


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ValueError, match="10000x10000 = 100,000,000 pixels is over the 89,478,485 limit"):
        load_image(bomb_png(), 16)  # the pixel data is not there: decoding would fail differently
    small = png(Image.new("RGB", (40, 30)))
    assert load_image(small, 16).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(small, 16, max_pixels=40 * 30 - 1)


def test_config_validation():
    assert VQConfig().tokens_per_image == 1024 and VQConfig().codebook_size == 8192  # Chameleon defaults
    with pytest.raises(ValueError, match="power of two"):
        VQConfig(downsample=12)
    with pytest.raises(ValueError, match="multiple"):
        VQConfig(resolution=100, downsample=16)


def test_quantizer_picks_nearest_and_restarts_dead_codes():
    q = Quantizer(4, 2, 0.25)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
    z = torch.tensor([[3.0, 0.2], [-0.1, -5], [0.1, 2], [-2, 0.5]]).T.reshape(1, 2, 2, 2)
    assert q.codes(z).flatten().tolist() == [0, 3, 1, 2]
    _, idx, loss = q(z)
    assert loss.item() > 0
    dead = torch.tensor([False, True, False, True])
    before = q.codebook.detach().clone()
    assert q.restart(dead, z, torch.Generator().manual_seed(0)) == 2
    assert torch.equal(q.codebook[~dead], before[~dead])  # rows the restart did not write: copies
    assert all(moved(b, a) for a, b in zip(q.codebook[dead], before[dead]))  # each dead code moved onto the data
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(4))


def test_metrics():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    noisier = (x + 0.8 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert (ssim(x, noisy) < 0.99).all() and (ssim(x, noisier) < ssim(x, noisy)).all()
    assert (ssim(x, -x) < 0).all()  # inverted structure
    assert (psnr(x, noisy) < 25).all() and (psnr(x, x) > 90).all()


def test_encode_decode_shapes_and_ranges():
    model = VQModel(VQConfig(resolution=32, downsample=4, codebook_size=16, channels=8, res_blocks=1)).eval()
    codes = model.encode(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert codes.shape == (3, 64) and codes.min() >= 0 and codes.max() < 16
    img = model.decode(codes)
    assert img.shape == (3, 3, 32, 32) and img.min() >= -1 and img.max() <= 1


@pytest.fixture(scope="module")
def images():
    return [draw_image(i) for i in range(64)]


def test_train_beats_constant_image_and_uses_codebook(tmp_path, images):
    shards = make_shards(tmp_path / "in", images=images[:48], pairs=[(im, "a caption") for im in images[48:]])
    logs = []
    m = train_vq([shards], tmp_path / "tok", VQConfig(**TINY), steps=150, batch_size=16, lr=3e-3, log_every=50,
                 restart_every=25, disc_weight=0, log=logs.append)
    assert m["step"] == 150 and m["usage"] > 0.5 and m["perplexity"] > 16
    assert sum("PSNR" in l and "codes used" in l and "perplexity" in l for l in logs) == 3
    rows = [json.loads(l) for l in (tmp_path / "tok" / LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 100, 150] and {"recon", "psnr", "ssim", "usage"} <= set(rows[0])

    x = to_unit(torch.from_numpy(np.stack([load_image(b, 16) for b in images])))
    model = VQModel.load(tmp_path / "tok")
    vq_psnr = psnr(model.decode(model.encode(x)), x).mean().item()
    constant = psnr(x.mean(0, keepdim=True).expand_as(x), x).mean().item()  # the best constant image
    assert vq_psnr > constant + 3.0, (vq_psnr, constant)
    used = model.encode(x).unique().numel()
    assert used >= 0.5 * 64


@pytest.mark.parametrize("disc_start", [4, 8])  # 8: the stop at step 7 is before the discriminator's first step
def test_resume_continues_from_checkpoint(tmp_path, images, disc_start):
    shards = make_shards(tmp_path / "in", images=images[:40] + [b"broken image bytes"])
    opts = dict(batch_size=8, lr=2e-3, log_every=5, checkpoint_every=5, restart_every=5, disc_weight=0.1,
                disc_start=disc_start, log=lambda m: None)
    train_vq([shards], tmp_path / "straight", VQConfig(**TINY), steps=12, **opts)
    first = train_vq([shards], tmp_path / "resumed", VQConfig(**TINY), steps=7, **opts)
    assert first["step"] == 7
    logs = []
    second = train_vq([shards], tmp_path / "resumed", VQConfig(**TINY), steps=12, **{**opts, "log": logs.append})
    assert any("resuming" in l and "step 7" in l for l in logs)
    assert second["step"] == 12 and second["disc"] is True
    a = VQModel.load(tmp_path / "straight").state_dict()
    b = VQModel.load(tmp_path / "resumed").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    last = lambda run: json.loads((tmp_path / run / LOG).read_text().splitlines()[-1])  # noqa: E731
    assert last("resumed")["recon"] == pytest.approx(last("straight")["recon"], rel=1e-5)
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / LOG).read_text().splitlines()]
    assert steps == [5, 7, 10, 12]  # the first run logged its last step too

    with pytest.raises(ValueError, match="other options"):
        train_vq([shards], tmp_path / "resumed", VQConfig(**TINY), steps=14, **{**opts, "lr": 1e-3})
    assert intact_checkpoint(tmp_path / "resumed").name == "step-00000012"  # the refusal left it as it was


def test_a_sigterm_saves_a_checkpoint_that_resumes_to_the_uninterrupted_result(tmp_path, images, monkeypatch):
    """train-vq runs on the one loop: SIGTERM stops it after the step in flight (here the
    5th, between two log records) with a checkpoint at that step and no tokenizer written;
    the rerun continues from there."""
    from mmtok.trainer import vq_train

    shards = make_shards(tmp_path / "in", images=images[:40])
    opts = dict(steps=10, batch_size=8, lr=2e-3, log_every=3, checkpoint_every=100, restart_every=4, disc_weight=0.1,
                disc_start=5, log=lambda m: None)
    train_vq([shards], tmp_path / "straight", VQConfig(**TINY), **opts)
    real, calls = vq_train._gan_step, []

    def signalled(*args):  # a scheduler's SIGTERM arrives during the 5th step
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(vq_train, "_gan_step", signalled)
    first = train_vq([shards], tmp_path / "resumed", VQConfig(**TINY), **opts)
    assert first["status"] == "interrupted" and first["step"] == 5
    assert intact_checkpoint(tmp_path / "resumed").name == "step-00000005"
    assert not (tmp_path / "resumed" / "vq.safetensors").exists()
    monkeypatch.setattr(vq_train, "_gan_step", real)
    second = train_vq([shards], tmp_path / "resumed", VQConfig(**TINY), **opts)
    assert second["status"] == "finished" and second["step"] == 10
    a = VQModel.load(tmp_path / "straight").state_dict()
    b = VQModel.load(tmp_path / "resumed").state_dict()
    # one step more or less moves weights by ~3e-3 here (measured); 1e-6 is rounding
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_shards_without_images_are_refused_before_anything_else(tmp_path, images):
    """Read from the indexes before the memory estimate (which would be of nothing); an
    image inside an interleaved document counts, as the image stream reads it."""
    texts = make_shards(tmp_path / "texts", texts=["only words", "more words"])
    logs = []
    with pytest.raises(ValueError, match="no images in .*texts: train-vq needs image or pair samples"):
        train_vq([texts], tmp_path / "tok", VQConfig(**TINY), steps=1, batch_size=2, log=logs.append)
    assert logs == [] and not (tmp_path / "tok" / "checkpoints").exists()
    docs = make_shards(tmp_path / "docs", texts=["words"], docs=[["a picture:", images[0], "end"]])
    m = train_vq([docs], tmp_path / "tok", VQConfig(**TINY), steps=1, batch_size=2, disc_weight=0, log=logs.append)
    assert m["step"] == 1


def test_saving_checkpoints_does_not_change_the_training(tmp_path, images):
    # a checkpoint before the discriminator's first step must not give its optimizer a state
    shards = make_shards(tmp_path / "in", images=images[:40])
    opts = dict(steps=9, batch_size=8, lr=2e-3, restart_every=4, disc_weight=0.1, disc_start=6, log=lambda m: None)
    train_vq([shards], tmp_path / "often", VQConfig(**TINY), checkpoint_every=3, **opts)
    train_vq([shards], tmp_path / "once", VQConfig(**TINY), checkpoint_every=100, **opts)
    a, b = VQModel.load(tmp_path / "often").state_dict(), VQModel.load(tmp_path / "once").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_an_old_format_checkpoint_is_refused_unread_and_restart_replaces_it(tmp_path, images):
    shards = make_shards(tmp_path / "in", images=images[:8])
    out = tmp_path / "tok"
    out.mkdir()
    # what an earlier mmtok wrote; the bytes are a pickle, which must never be loaded
    (out / "vq_ckpt.json").write_text('{"step": 3}')
    (out / "vq_ckpt.safetensors").write_bytes(b"\x80\x04K\x01.")
    opts = dict(steps=2, batch_size=4, disc_weight=0, log=lambda m: None)
    with pytest.raises(ValueError, match=r"vq_ckpt\.json is a train-vq checkpoint in the format of an earlier mmtok.*--restart"):
        train_vq([shards], out, VQConfig(**TINY), **opts)
    assert not (out / "vq.safetensors").exists() and (out / "vq_ckpt.safetensors").exists()
    m = train_vq([shards], out, VQConfig(**TINY), restart=True, **opts)
    assert m["step"] == 2 and not any((out / name).exists() for name in OLD_CHECKPOINT)
    assert intact_checkpoint(out).name == "step-00000002"


def test_codebook_must_match_vocab(tmp_path, images):
    shards = make_shards(tmp_path / "in", images=images[:8])
    Vocab.layout(2000, 32, 16).save(tmp_path / "tok")
    with pytest.raises(ValueError, match="--codebook-size 32"):
        train_vq([shards], tmp_path / "tok", VQConfig(**TINY), steps=1, log=lambda m: None)
    Vocab.layout(2000, 64, 1024).save(tmp_path / "tok")
    train_vq([shards], tmp_path / "tok", VQConfig(**TINY), steps=2, batch_size=4, disc_weight=0, log=lambda m: None)
    assert Vocab.load(tmp_path / "tok").image_tokens_per_image == 64  # (16/2)^2, from the trained VQ


def test_perceptual_loss_uses_supplied_weights_only(tmp_path, images):
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in vgg16(weights=None).features.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    loss = PerceptualLoss(tmp_path / "vgg.safetensors")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    # x and x share one batch: 0 up to rounding; 1% noise on x already gives ~7e-4
    assert loss(x, x).item() < 1e-6 and loss(x, -x).item() > 0.1
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not torchvision VGG16"):
        PerceptualLoss(tmp_path / "bad.safetensors")
    shards = make_shards(tmp_path / "in", images=images[:8])
    m = train_vq([shards], tmp_path / "tok", VQConfig(**TINY), steps=2, batch_size=4, disc_weight=0,
                 perceptual_weights=str(tmp_path / "vgg.safetensors"), log=lambda m: None)
    assert m["step"] == 2


@pytest.mark.slow
def test_train_vq_under_torchrun_two_processes(tmp_path, images):
    import os
    import subprocess
    import sys

    shards = make_shards(tmp_path / "in", images=images[:24])

    def train(out, steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mmtok.cli.app",
               "train-vq", str(shards), "--out", str(tmp_path / out), "--steps", str(steps), "--codebook-size", "64",
               "--resolution", "16", "--downsample", "2", "--channels", "8", "--res-blocks", "1", "--batch-size", "4",
               "--log-every", "2", "--restart-every", "3", "--disc-start", "2", "--checkpoint-every", "2", "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout[r.stdout.index("{"):])  # rank 0 alone prints it

    summary = train("tok", 4)
    assert summary["step"] == 4 and summary["disc"] is True
    rows = [json.loads(l) for l in (tmp_path / "tok" / LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert VQModel.load(tmp_path / "tok").encode(torch.zeros(1, 3, 16, 16)).shape == (1, 64)
    # resumed on two processes (mid restart window, each rank at its own image position) as if never stopped
    assert train("tok", 7)["step"] == 7 and train("straight", 7)["step"] == 7
    a, b = VQModel.load(tmp_path / "straight").state_dict(), VQModel.load(tmp_path / "tok").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
