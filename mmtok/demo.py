"""The built-in demo: generate a small multimodal corpus, then run every stage on it.

The corpus is made here, deterministically: PIL-drawn shapes with captions that describe
them, short texts, interleaved documents, tones and speech-like audio, and short videos
from ffmpeg's test sources. A few broken files show the quarantine at work.
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "stripe")


def draw_shape(shape: str, fg: str, bg: str, size: int = 128, seed: int = 0):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), COLOURS[bg])
    d = ImageDraw.Draw(im)
    m = size // 6 + rng.randint(0, size // 10)
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[fg])
    elif shape == "triangle":
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=COLOURS[fg])
    else:
        for x in range(0, size, size // 8):
            d.rectangle((x, 0, x + size // 16, size), fill=COLOURS[fg])
    return im


def sentence(rng: random.Random) -> str:
    c1, c2 = rng.sample(sorted(COLOURS), 2)
    s = rng.choice(SHAPES)
    templates = [
        f"The {c1} {s} sits on a {c2} background.",
        f"A {s} painted {c1} is easy to see against {c2}.",
        f"We counted {rng.randint(2, 99)} {c1} shapes and {rng.randint(2, 99)} {c2} ones.",
        f"Is the {s} {c1} or {c2}? It is {c1}.",
        f"Shapes like the {s} come in many colours, such as {c1} and {c2}.",
    ]
    return rng.choice(templates)


def tone(freqs: list[float], seconds: float, sr: int, speechlike: bool, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    if not speechlike:
        x = sum(np.sin(2 * np.pi * f * t) for f in freqs) / len(freqs)
    else:  # a voiced buzz with moving formants and syllable-rate amplitude, like speech
        f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        x = sum(np.sin(k * phase) / k for k in range(1, 12))
        x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
        x += 0.02 * rng.standard_normal(len(t))
    return (0.4 * x / max(1e-9, np.abs(x).max())).astype("float32")


def make_corpus(root: Path, n_images: int = 48, n_texts: int = 60, n_docs: int = 16) -> Path:
    """Write the demo corpus under `root` and return it."""
    import soundfile as sf

    from mmtok.media import ffmpeg_exe
    from mmtok.speech_standin import speak

    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n_images):
        shape, (fg, bg) = SHAPES[i % len(SHAPES)], rng.sample(sorted(COLOURS), 2)
        im = draw_shape(shape, fg, bg, seed=i)
        ext = "png" if i % 3 == 0 else "jpg"
        im.save(root / "images" / f"img{i:03d}.{ext}")
        caption = f"a {fg} {shape} on a {bg} background"
        captions.append((f"images/img{i:03d}.{ext}", caption))
        if i % 4 != 3:  # most images have a caption beside them (a pair); some stand alone
            (root / "images" / f"img{i:03d}.txt").write_text(caption + "\n")
    (root / "texts").mkdir(exist_ok=True)
    for i in range(n_texts):
        (root / "texts" / f"t{i:03d}.txt").write_text(" ".join(sentence(rng) for _ in range(rng.randint(2, 6))))
    with open(root / "docs.jsonl", "w") as f:
        for i in range(n_docs):
            segs = []
            for _ in range(rng.randint(1, 3)):
                path, cap = rng.choice(captions)
                segs += [{"text": sentence(rng)}, {"image": path}, {"text": f"Above: {cap}."}]
            f.write(json.dumps({"segments": segs}) + "\n")
        for i in range(8):
            f.write(json.dumps({"text": sentence(rng) + " " + sentence(rng)}) + "\n")
    (root / "audio").mkdir(exist_ok=True)
    for i in range(6):
        speech = i % 2 == 1
        x = tone([220 * (i + 1), 330 * (i + 1)], 2.0 + i * 0.5, 16000 if i < 4 else 44100, speech, seed=i)
        name = f"a{i:02d}.{'flac' if speech else 'wav'}"
        sf.write(root / "audio" / name, x, 16000 if i < 4 else 44100)
        label = "speech-like babble" if speech else f"a steady tone at {220 * (i + 1)} hertz"
        (root / "audio" / f"a{i:02d}.txt").write_text(label + "\n")
    (root / "video").mkdir(exist_ok=True)
    videos = [("testsrc=size=160x120:rate=25", "a test pattern with colour bars and a moving counter"),
              ("smptebars=size=160x120:rate=30", "vertical colour bars")]
    videos += [(f"color=c={c}:size=128x96:rate=25", f"a plain {c} screen") for c in ("red", "green", "blue", "yellow")]
    for i, (src, caption) in enumerate(videos):
        out = root / "video" / f"v{i}.mp4"
        if not out.exists():
            subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", f"{src}:duration={2 + i % 3}",
                            "-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "12", str(out)], check=True)
        (root / "video" / f"v{i}.txt").write_text(caption + "\n")
    # speech with known text (espeak-ng when installed, else a deterministic stand-in voice)
    (root / "speech").mkdir(exist_ok=True)
    for i in range(24):
        c, shape = sorted(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        text = f"the {c} {shape}"
        wave, _ = speak(text)
        sf.write(root / "speech" / f"s{i:02d}.wav", wave, 16000)
        (root / "speech" / f"s{i:02d}.txt").write_text(text + "\n")
    (root / "broken").mkdir(exist_ok=True)
    good = (root / "images" / "img001.jpg").read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "broken" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return root


def make_chameleon_checkpoint(out: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny random-weight Chameleon in Hugging Face's layout (config.json, model.safetensors,
    tokenizer.json), written with safetensors and tokenizers alone, so that the demo needs no
    transformers: a byte-level BPE laid out as Chameleon's (<s> <pad> </s> <unk>, image tokens
    IMGIMG...Z for 256 codes, <eoss> <racm3:break> <image>, text), mmtok's decoder with
    Chameleon's options in transformers' names (trainer/hf_export.py), and a 64 px VQ-GAN."""
    import json

    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mmtok.chameleon import image_token_name
    from mmtok.chameleon_vq import ChameleonVQ, ChameleonVQConfig
    from mmtok.trainer.config import ModelConfig
    from mmtok.trainer.hf_export import VQ_PREFIX, to_hf_state
    from mmtok.trainer.model import Decoder

    codes = 256
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", *(image_token_name(c) for c in range(codes)), "<eoss>", "<racm3:break>",
                "<image>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), image_range=(4, 4 + codes), n_layers=2, d_model=64, n_heads=4,
                      ffn_hidden=128, qk_norm="chameleon", max_seq_len=4096)
    vq = ChameleonVQ(ChameleonVQConfig(resolution=64, codebook_size=codes, embed_dim=16, latent_channels=16,
                                       base_channels=32, channel_multiplier=(1, 2, 2, 4), num_res_blocks=1,
                                       attn_resolutions=(8,), decoder=False))
    tensors = {**to_hf_state(Decoder(cfg).state_dict(), cfg),
               **{VQ_PREFIX + k: v.contiguous() for k, v in vq.state_dict().items()}}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    c = vq.cfg
    config = {"architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
              "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "vocabulary_map": vocab,
              "image_token_id": vocab["<image>"], "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
              "vq_config": {"embed_dim": c.embed_dim, "num_embeddings": c.codebook_size, "latent_channels": c.latent_channels,
                            "resolution": c.resolution, "base_channels": c.base_channels,
                            "channel_multiplier": list(c.channel_multiplier), "num_res_blocks": c.num_res_blocks,
                            "attn_resolutions": list(c.attn_resolutions)}}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                                           "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return out


def check_hf_export(export: Path, run: Path, tokdir: Path) -> dict:
    """Load the export back through transformers (when installed) and compare its logits
    with mmtok's own on a sentence: the export's worth, in one number."""
    try:
        from transformers import ChameleonForConditionalGeneration
    except ImportError:
        return {"loaded": False, "why": "transformers is not installed (pip install 'mmtok[hf]')"}
    import torch

    from mmtok.tokenize import Tokenizer
    from mmtok.trainer.checkpoint import load_run

    ids = torch.as_tensor(Tokenizer.load(tokdir).encode_text("The red circle sits on a blue background.").astype("int64"))[None]
    model, run_cfg, _ = load_run(run)
    cfg = run_cfg.model
    theirs = ChameleonForConditionalGeneration.from_pretrained(export).eval()
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids))[0]
        hf = theirs(input_ids=ids).logits
    text = torch.ones(cfg.vocab_size, dtype=torch.bool)
    text[slice(*cfg.image_range)] = False  # transformers' Chameleon never predicts image tokens
    return {"loaded": True, "max_logit_difference": float((ours - hf)[..., text].abs().max())}


def _step(title: str, args: list[str], log) -> None:
    from rich.console import Console

    cmd = [sys.executable, "-m", "mmtok.cli.app", *args]
    Console(stderr=True).rule(f"[bold]{title}")
    Console(stderr=True).print("$ mmtok " + " ".join(shlex.quote(a) for a in args), highlight=False)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    log.append({"step": title, "command": "mmtok " + " ".join(args), "seconds": round(time.perf_counter() - t0, 2),
                "exit": rc})
    if rc != 0:
        raise SystemExit(f"demo step '{title}' failed with exit status {rc}")


def run_demo(out: Path, workers: int = 2) -> None:
    """Every stage on a corpus made here, as a user runs them (the CLI), in OUT; a step that
    fails stops the demo naming it (`_step`)."""
    out = _fresh(Path(out))
    corpus = make_corpus(out / "corpus")
    log: list[dict] = []
    w = ["--workers", str(workers)]
    tok = _data_steps(out, corpus, w, log)
    _moma_steps(out, tok, log)
    _mot_steps(out, log)
    chameleon = _chameleon_steps(out, corpus, w, log)
    _unimoe_steps(out, corpus, w, tok, log)
    (out / "demo-steps.json").write_text(json.dumps(log, indent=1))
    _tell_where(out, corpus, tok, *chameleon)


def _fresh(out: Path) -> Path:
    """OUT, empty: a previous demo's output is removed, anything else refused."""
    marker = out / ".mmtok-demo"
    if out.exists() and any(out.iterdir()):
        if not (marker.exists() or (out / "demo-steps.json").exists()):
            raise ValueError(f"{out} exists and is not a demo output directory; pass another --out")
        shutil.rmtree(out)  # a previous demo: start again from scratch
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return out


def _data_steps(out: Path, c: Path, w: list[str], log: list[dict]) -> str:
    """Raw files to token shards: shard, media features, both tokenizers, codes, tokens,
    and back. Returns the tokenizer directory."""
    _step("shard the raw corpus", ["shard", str(c / "images"), str(c / "texts"), str(c / "docs.jsonl"),
                                   str(c / "audio"), str(c / "video"), str(c / "broken"),
                                   "--out", str(out / "shards"), "--max-count", "40", *w], log)
    _step("inspect the shards", ["inspect", str(out / "shards")], log)
    _step("8 uniform keyframes per video", ["extract-keyframes", str(out / "shards"), "--out", str(out / "frames"),
                                            "--mode", "uniform", "--frames", "8", "--size", "64", *w], log)
    _step("Whisper log-mel and fbank features", ["extract-audio", str(out / "shards"), "--out",
                                                 str(out / "audio-features"), "--features", "whisper,fbank", *w], log)
    tok = str(out / "tokenizer")
    _step("train the BPE tokenizer (unified vocabulary)", ["train-bpe", str(out / "shards"), "--out", tok,
                                                          "--vocab-size", "800", "--image-codes", "256"], log)
    _step("train the VQ image tokenizer", ["train-vq", str(out / "shards"), "--out", tok, "--steps", "100",
                                           "--codebook-size", "256", "--resolution", "64", "--downsample", "8",
                                           "--channels", "16", "--res-blocks", "1", "--batch-size", "8", "--lr", "1e-3",
                                           "--log-every", "25", "--disc-weight", "0"], log)
    _step("encode images and video frames to codes", ["tokenize-images", str(out / "shards"), str(out / "frames"),
                                                      "--tokenizer", tok, "--out", str(out / "codes"), *w], log)
    _step("tokenize texts, pairs and documents", ["tokenize", str(out / "shards"), str(out / "frames"), "--tokenizer",
                                                  tok, "--codes", str(out / "codes"), "--out", str(out / "tokens"), *w],
          log)
    _step("decode tokens back to text and PNG", ["detokenize", str(out / "tokens"), "--tokenizer", tok, "--out",
                                                 str(out / "decoded"), "--limit", "20"], log)
    return tok


def _moma_steps(out: Path, tok: str, log: list[dict]) -> None:
    """Plan, MoMa training on 2 processes, the auxiliary routers, eval, upcycling, generation, export."""
    _step("plan a balanced 1:1 mixture for 2 ranks", ["balance-mix", str(out / "tokens"), "--out", str(out / "plan"),
                                                      "--world-size", "2", "--experts", "1t1i", "--seq-len", "256",
                                                      "--micro-batch", "2", "--steps", "40", "--seed", "0", "--plot",
                                                      str(out / "plan.png")], log)
    _step("inspect the plan", ["inspect", str(out / "plan")], log)
    _step("train MoMa 1t1i with FSDP2 on 2 processes", ["train", "--plan", str(out / "plan"), "--out", str(out / "run"),
                                                         "--model", "moma", "--experts", "1t1i", "--preset", "tiny",
                                                         "--steps", "20", "--ckpt-every", "10", "--nproc", "2"], log)
    _step("train MoMa's auxiliary routers (causal inference), 2 processes",
          ["train", "--train-aux-routers", "--resume", "--plan", str(out / "plan"), "--out", str(out / "run"),
           "--steps", "60", "--nproc", "2"], log)
    _step("evaluate (batch and causal routing)", ["eval", str(out / "run"), "--data",
                                                  str(out / "tokens"), "--pairs", str(out / "tokens"),
                                                  "--max-docs", "100"], log)
    _step("upcycle 1t1i into 2t2i", ["upcycle", str(out / "run"), "--experts", "2t2i", "--out",
                                     str(out / "run-2t2i")], log)
    _step("continue training the upcycled model", ["train", "--plan", str(out / "plan"), "--out",
                                                   str(out / "run-2t2i"), "--model", "moma", "--experts", "2t2i",
                                                   "--router-noise", "gumbel", "--preset", "tiny", "--steps", "10",
                                                   "--ckpt-every", "10", "--nproc", "2", "--resume"], log)
    _step("generate text", ["generate", str(out / "run"), "--tokenizer", tok, "--prompt",
                            "a red square", "--max-tokens", "60", "--seed", "0", "--out", str(out / "generated")], log)
    _step("generate an image", ["generate", str(out / "run"), "--tokenizer", tok, "--prompt",
                                "a red square", "--generate-image", "--max-tokens", "80", "--seed", "0", "--out",
                                str(out / "generated-image")], log)
    _step("export to safetensors", ["export", str(out / "run"), "--out", str(out / "model")], log)
    _step("inspect the training run", ["inspect", str(out / "run")], log)


def _mot_steps(out: Path, log: list[dict]) -> None:
    """Mixture-of-Transformers on the same plan: every weight untied by modality, no router."""
    _step("train Mixture-of-Transformers (weights untied by modality, no router)",
          ["train", "--model", "mot", "--plan", str(out / "plan"), "--out", str(out / "run-mot"), "--preset", "tiny",
           "--steps", "20"], log)
    _step("evaluate MoT", ["eval", str(out / "run-mot"), "--data", str(out / "tokens"), "--max-docs", "100"], log)


def _chameleon_steps(out: Path, c: Path, w: list[str], log: list[dict]) -> tuple[Path, str, dict]:
    """A Chameleon checkpoint's tokenizer in, its weights as a run's start, the model out in
    HF format and loaded back. Returns (checkpoint, tokenizer directory, the load check)."""
    texts = [p.read_text() for p in sorted((c / "texts").glob("*.txt"))]
    hf = make_chameleon_checkpoint(out / "chameleon-hf", texts)
    tc = str(out / "tokenizer-chameleon")
    _step("import Chameleon's tokenizer (a tiny random checkpoint made here)",
          ["import-tokenizer", "chameleon", str(hf), "--out", tc], log)
    _step("encode images with Chameleon's VQ-GAN", ["tokenize-images", str(out / "shards"), "--tokenizer", tc, "--out",
                                                    str(out / "codes-chameleon"), *w], log)
    _step("tokenize with Chameleon's ids", ["tokenize", str(out / "shards"), "--tokenizer", tc, "--codes",
                                            str(out / "codes-chameleon"), "--out", str(out / "tokens-chameleon"), *w], log)
    _step("plan for the Chameleon model", ["balance-mix", str(out / "tokens-chameleon"), "--out", str(out / "plan-chameleon"),
                                           "--world-size", "1", "--ratio", "1:1", "--seq-len", "256", "--micro-batch", "2",
                                           "--steps", "10", "--seed", "0"], log)
    _step("train from the Chameleon checkpoint", ["train", "--init-from", f"hf:{hf}", "--plan", str(out / "plan-chameleon"),
                                                  "--out", str(out / "run-chameleon"), "--steps", "10"], log)
    _step("export to Hugging Face format", ["export", str(out / "run-chameleon"), "--out", str(out / "model-hf"),
                                            "--format", "hf", "--tokenizer", tc], log)
    check = check_hf_export(out / "model-hf", out / "run-chameleon", Path(tc))
    log.append({"step": "load the export back through transformers", "command": "python: from_pretrained", **check,
                "exit": 0})
    return hf, tc, check


def _unimoe_steps(out: Path, c: Path, w: list[str], tok: str, log: list[dict]) -> None:
    """Speech, audio, video and image features through connectors into a LoRA-expert MoE."""
    _step("shard the speech corpus", ["shard", str(c / "speech"), "--out", str(out / "shards-speech"), *w], log)
    _step("Whisper features of the speech", ["extract-audio", str(out / "shards-speech"), "--out",
                                             str(out / "speech-features"), "--features", "whisper", *w], log)
    _step("a dense language model for Uni-MoE to start from", ["train", "--model", "dense", "--plan", str(out / "plan"),
                                                               "--out", str(out / "run-dense"), "--preset", "tiny",
                                                               "--steps", "40"], log)
    uni = ["--speech", str(out / "speech-features"), "--audio", str(out / "audio-features"), "--video",
           str(out / "frames"), "--image", str(out / "shards"), "--tokenizer", tok, "--steps", "20", "--queries", "8",
           "--connector-layers", "2", "--batch-size", "8", "--holdout", "0.3"]
    prev = str(out / "run-dense")
    for stage in ("align", "experts", "tune"):
        nproc = ["--nproc", "2"] if stage == "tune" else []  # the same FSDP2 loop as every run
        _step(f"Uni-MoE stage {stage}", ["train", "--model", "uni-moe", "--stage", stage, "--out",
                                         str(out / "unimoe" / stage), "--init", prev, *uni, *nproc], log)
        prev = str(out / "unimoe" / stage)
    _step("evaluate Uni-MoE (loss per modality, routing)", ["eval", prev], log)


def _tell_where(out: Path, corpus: Path, tok: str, hf: Path, tc: str, check: dict) -> None:
    from rich.console import Console

    con = Console(stderr=True)
    con.rule("[bold green]demo finished")
    con.print(f"corpus:  {corpus}")
    con.print(f"shards:  {out / 'shards'}  (manifest.json, index.parquet, quarantine.jsonl)")
    con.print(f"video frames: {out / 'frames'};  audio features: {out / 'audio-features'}")
    con.print(f"tokenizer: {tok};  token shards: {out / 'tokens'};  decoded samples: {out / 'decoded'}")
    con.print(f"mixture plan: {out / 'plan'} (plot {out / 'plan.png'});  training run: {out / 'run'};  "
              f"exported model: {out / 'model'}")
    con.print(f"upcycled run: {out / 'run-2t2i'};  samples: {out / 'generated'}, {out / 'generated-image'}")
    con.print(f"Mixture-of-Transformers run: {out / 'run-mot'} (eval report in run-mot/eval)")
    con.print(f"Chameleon: checkpoint {hf}, tokenizer {tc}, run {out / 'run-chameleon'}, HF export {out / 'model-hf'} "
              f"(loaded back: {check})")
    con.print(f"Uni-MoE stages: {out / 'unimoe'} (align, experts, tune; eval report in tune/eval)")
    con.print(f"steps and timings: {out / 'demo-steps.json'}")
