"""Chameleon's tokenizer imported as an mmtok tokenizer (`mmtok import-tokenizer chameleon`),
checked against `transformers`' own Chameleon on a tiny random-weight model built here, and
against taming-transformers' decoder (the VQ-GAN code Chameleon's release uses)."""

import hashlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from helpers.media import draw_image, make_shards, photo

from helpers.chameleon import CODEBOOK, RES, TEXTS, TPI, VQ, save_chameleon, text_tokenizer

from mmtok.chameleon import ROLES, code_of, image_token_name, import_chameleon
from mmtok.shards import ShardReader, load_npy
from mmtok.tokenize import Tokenizer
from mmtok.vocab import FORMAT_ANY, Vocab


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    """A saved tiny ChameleonForConditionalGeneration (Hugging Face layout) and the same VQ in
    Meta's release layout, with a decoder (Hugging Face's checkpoints have none)."""
    from taming.modules.diffusionmodules.model import Decoder

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("chameleon")
    tok = text_tokenizer()
    hf = tmp / "hf"
    model = save_chameleon(hf, tok)

    ddconfig = dict(double_z=False, z_channels=VQ["latent_channels"], resolution=RES, in_channels=3, out_ch=3,
                    ch=VQ["base_channels"], ch_mult=VQ["channel_multiplier"], num_res_blocks=VQ["num_res_blocks"],
                    attn_resolutions=VQ["attn_resolutions"], dropout=0.0)
    decoder = Decoder(**ddconfig).eval()
    state = {k: v.clone() for k, v in model.model.vqmodel.state_dict().items()}
    state.update({f"decoder.{k}": v.clone() for k, v in decoder.state_dict().items()})
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)  # training-only weights are dropped
    meta = tmp / "meta"
    (meta / "tokenizer").mkdir(parents=True)
    torch.save({"state_dict": state}, meta / "tokenizer" / "vqgan.ckpt")
    import yaml

    (meta / "tokenizer" / "vqgan.yaml").write_text(yaml.safe_dump(
        {"model": {"target": "taming.models.vqgan.VQModel",
                   "params": {"embed_dim": VQ["embed_dim"], "n_embed": CODEBOOK, "ddconfig": ddconfig,
                              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}))
    shutil.copy(hf / "tokenizer.json", meta / "tokenizer" / "text_tokenizer.json")
    import_chameleon(hf, tmp / "tok_hf")
    import_chameleon(meta, tmp / "tok_meta")
    return {"model": model, "hf": hf, "meta": meta, "tok_hf": tmp / "tok_hf", "tok_meta": tmp / "tok_meta",
            "decoder": decoder, "text": tok}


def _images():
    """PNG and JPEG, square and not (97 x 90: the long side's rounding matters), one with alpha."""
    out = [photo(1, 160, 120), photo(2, 97, 90, "PNG"), draw_image(3, 70, "RGBA"), photo(4, 64, 200), draw_image(5, 64)]
    return out


def _processor():
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    return ChameleonImageProcessorPil(size={"shortest_edge": RES}, crop_size={"height": RES, "width": RES})


def test_vocabulary_keeps_chameleons_ids(chameleon):
    v = Vocab.load(chameleon["tok_hf"])
    text = chameleon["text"]
    assert v.format == FORMAT_ANY and v.vocab_size == text.get_vocab_size() > 300
    assert v.image_range == (4, 4 + CODEBOOK) and v.image_tokens_per_image == TPI
    assert {r: v[r] for r in ROLES} == {r: text.token_to_id(t) for r, t in ROLES.items()}
    assert (v["<boi>"], v["<eoi>"], v["<eod>"]) == (text.token_to_id("<racm3:break>"), text.token_to_id("<eoss>"), 2)
    lo, hi = v.text_range
    assert lo > v["<boi>"] and hi == text.get_vocab_size() and text.token_to_id("the") in range(lo, hi)
    assert code_of(image_token_name(1234)) == 1234 and image_token_name(1234) == "IMGIMGBCDEZ" and code_of("IMGIMGZ") is None
    assert Vocab.from_dict(json.loads((chameleon["tok_hf"] / "vocab.json").read_text())) == v
    # the file is copied byte for byte, so its ids (and the fingerprint) are Chameleon's own
    assert (chameleon["tok_hf"] / "text_tokenizer.json").read_bytes() == (chameleon["hf"] / "tokenizer.json").read_bytes()


def test_mmtok_layout_bytes_unchanged():
    """The general layout must not change what train-bpe writes (fingerprints of existing tokenizers)."""
    for kw, sha in [({}, "6cdb925392b087cb2c9688ee620c2abca1488f0a081ba3e815f20bcadf040edd"),
                    (dict(vocab_size=1024, image_codes=64, image_tokens_per_image=16),
                     "1b5bd5ae3ac69cfec034f3981ce0e446eeda3d2bdec5442c0737de42c731ca12")]:
        data = json.dumps(Vocab.layout(**kw).to_dict(), indent=1, sort_keys=True).encode()
        assert hashlib.sha256(data).hexdigest() == sha


def test_image_codes_equal_transformers(chameleon):
    images = _images()
    tok = Tokenizer.load(chameleon["tok_hf"], device="cpu")
    pil = [Image.open(io.BytesIO(b)) for b in images]
    pixels = _processor()(pil, return_tensors="pt").pixel_values
    ours = torch.stack([tok.vq.scale(torch.from_numpy(tok.preprocess(b))) for b in images])
    # one grey level is 0.0078 here: any resize or rounding difference is far above the tolerance
    torch.testing.assert_close(ours, pixels, atol=1e-6, rtol=0)
    codes = tok.encode_images(images, batch_size=len(images))
    model = chameleon["model"]
    with torch.no_grad():
        want = model.model.vqmodel.encode(pixels).image_tokens.view(len(images), -1).numpy()
        ids = model.model.get_image_tokens(pixels).numpy()
    assert codes.shape == (len(images), TPI)
    np.testing.assert_array_equal(codes, want)
    np.testing.assert_array_equal(codes + tok.vocab.image_range[0], ids)  # transformers' own BPE ids
    assert len({c.tobytes() for c in codes}) == len(images) and len(np.unique(codes)) > 10  # not a degenerate VQ


def test_text_ids_equal_transformers(chameleon):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(chameleon["hf"])
    tok = Tokenizer.load(chameleon["tok_hf"])
    for text in TEXTS + ["the quick brown fox", ""]:
        ids = tok.encode_text(text)
        assert ids.tolist() == ref(text, add_special_tokens=False).input_ids
        assert tok.decode_text(ids) == text == ref.decode(ids.tolist())
    # text that spells a special is plain text: it cannot open an image block
    ids = tok.encode_text("a <racm3:break> b <eoss> </s>")
    assert not np.isin(ids, list(tok.vocab.specials.values())).any() and tok.decode_text(ids) == "a <racm3:break> b <eoss> </s>"


def test_meta_release_gives_the_same_codes_and_the_reference_decoding(chameleon):
    images = _images()
    meta, hf = Tokenizer.load(chameleon["tok_meta"], "cpu"), Tokenizer.load(chameleon["tok_hf"], "cpu")
    assert meta.vocab == hf.vocab
    codes = meta.encode_images(images, batch_size=len(images))
    np.testing.assert_array_equal(codes, hf.encode_images(images, batch_size=len(images)))
    g = RES // 8
    with torch.no_grad():
        got = meta.vq.decode(torch.as_tensor(codes))
        z = chameleon["model"].model.vqmodel.quantize.embedding(torch.as_tensor(codes).view(-1, g, g)).permute(0, 3, 1, 2)
        want = chameleon["decoder"](chameleon["model"].model.vqmodel.post_quant_conv(z)).clamp(-1, 1)
    assert want.std() > 1e-3  # a real picture, not a constant
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [im.size for im in meta.decode_images(codes[:2])] == [(RES, RES)] * 2
    with pytest.raises(ValueError, match="only the VQ encoder"):
        hf.decode_images(codes[:1])


def run_cli(*args):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_import_then_tokenize_and_detokenize(chameleon, tmp_path):
    r = run_cli("import-tokenizer", "chameleon", chameleon["meta"], "--out", tmp_path / "tok", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["layout"] == "meta" and summary["image_range"] == [4, 4 + CODEBOOK] and summary["decoder"]
    r = run_cli("import-tokenizer", "chameleon", chameleon["meta"], "--out", tmp_path / "tok")
    assert r.exit_code == 2 and "already holds a tokenizer" in r.output
    images = _images()
    shards = make_shards(tmp_path / "in", texts=TEXTS[:2], images=images[:2], pairs=[(images[2], "a cat")])
    tok = tmp_path / "tok"
    assert run_cli("tokenize-images", shards, "--tokenizer", tok, "--out", tmp_path / "codes", "--quiet").exit_code == 0
    r = run_cli("tokenize", shards, "--tokenizer", tok, "--out", tmp_path / "tokens", "--codes", tmp_path / "codes", "--quiet")
    assert r.exit_code == 0, r.output
    t = Tokenizer.load(tok, "cpu")
    docs = {s.key: load_npy(s.members["npy"]) for s in ShardReader(tmp_path / "tokens")}
    want = t.encode_images(images[:1], batch_size=1)[0] + 4
    block = docs["i0000"]
    assert block[0] == t.vocab["<boi>"] and block[-2] == t.vocab["<eoi>"] and block[-1] == 2  # </s>
    np.testing.assert_array_equal(block[1:-2], want)
    np.testing.assert_array_equal(docs["t0000"][:-1], t.encode_text(TEXTS[0]))
    r = run_cli("detokenize", tmp_path / "tokens", "--tokenizer", tok, "--out", tmp_path / "dec", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dec" / "t0000.txt").read_text() == TEXTS[0] and (tmp_path / "dec" / "i0000-0.png").exists()
    # imported from Hugging Face: encodes, but refuses to decode, in one line
    assert run_cli("import-tokenizer", "chameleon", chameleon["hf"], "--out", tmp_path / "tok_hf").exit_code == 0
    r = run_cli("detokenize", tmp_path / "tokens", "--tokenizer", tmp_path / "tok_hf", "--out", tmp_path / "dec2")
    assert r.exit_code == 2 and "only the VQ encoder" in r.output and "Traceback" not in r.output


class _Payload:
    """Pickled into a fake vqgan.ckpt: unpickling it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_ckpt_is_never_unpickled_beyond_tensors(chameleon, tmp_path):
    meta = tmp_path / "meta"
    shutil.copytree(chameleon["meta"], meta)
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "hook": _Payload(marker)},
               meta / "tokenizer" / "vqgan.ckpt")
    r = run_cli("import-tokenizer", "chameleon", meta, "--out", tmp_path / "tok")
    assert r.exit_code == 2 and "weights_only=True" in r.output and "Traceback" not in r.output
    assert not marker.exists() and not (tmp_path / "tok" / "vocab.json").exists()


def test_bad_sources_fail_in_one_line(chameleon, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("import-tokenizer", "chameleon", tmp_path / "empty", "--out", tmp_path / "tok")
    assert r.exit_code == 2 and "neither a Hugging Face Chameleon checkpoint" in r.output
    r = run_cli("import-tokenizer", "llamagen", tmp_path / "empty", "--out", tmp_path / "tok")
    assert r.exit_code == 2 and "supported: chameleon" in r.output
    hf = tmp_path / "hf"
    shutil.copytree(chameleon["hf"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vq_config"]["num_embeddings"] = 128  # the tokenizer has 256 image tokens
    (hf / "config.json").write_text(json.dumps(cfg))
    r = run_cli("import-tokenizer", "chameleon", hf, "--out", tmp_path / "tok")
    assert r.exit_code == 2 and "image tokens are not codes 0..127" in r.output and "Traceback" not in r.output


def test_cli_start_up_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom mmtok.cli.app import app\n"
            "r = CliRunner().invoke(app, ['import-tokenizer', '--help'])\nassert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]


def test_training_into_an_imported_tokenizer_is_refused(chameleon, tmp_path):
    from mmtok.bpe import train_bpe
    from mmtok.vq import VQConfig
    from mmtok.trainer.vq_train import train_vq

    tok = tmp_path / "tok"
    shutil.copytree(chameleon["tok_meta"], tok)
    before = {p.name: p.read_bytes() for p in tok.iterdir()}
    shards = make_shards(tmp_path / "in", texts=TEXTS, images=[draw_image(0)])
    with pytest.raises(ValueError, match="holds an imported tokenizer"):
        train_vq([shards], tok, VQConfig(resolution=16, downsample=2, codebook_size=CODEBOOK, channels=8, res_blocks=1),
                 steps=1, batch_size=1, disc_weight=0, log=lambda m: None)
    with pytest.raises(ValueError, match="holds an imported tokenizer"):
        train_bpe([shards], tok, vocab_size=1024, image_codes=CODEBOOK, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in tok.iterdir()} == before


def test_generation_grammar_reads_the_imported_layout(chameleon):
    """generate's constraint needs nothing but vocab.json: text or <boi>/<eod> outside an
    image block, then exactly the image codes, then <eoi>."""
    from mmtok.trainer.generate import Constraint

    v = Vocab.load(chameleon["tok_hf"])
    d, n = v.to_dict(), v.vocab_size
    rule = Constraint(d, np.asarray([v.text_range[0]]))
    ok = rule.allowed(n, room=1000)
    assert ok[slice(*v.text_range)].all() and not ok[slice(*v.image_range)].any()
    assert ok[v["<boi>"]] and ok[v["<eod>"]] and not ok[v["<eoi>"]] and not ok[v["<pad>"]] and not ok[v["<bos>"]]
    rule.step(v["<boi>"])
    ok = rule.allowed(n, room=1000)
    assert ok.sum() == CODEBOOK and ok[slice(*v.image_range)].all()
    for _ in range(TPI):
        rule.step(v.image_range[0])
    assert rule.allowed(n, room=1000).nonzero().flatten().tolist() == [v["<eoi>"]]
