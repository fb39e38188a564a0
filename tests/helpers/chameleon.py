"""A tiny random-weight Chameleon built with `transformers` (the reference), shared by the
tokenizer, weights and export tests: a Chameleon-layout text tokenizer and a saved
`ChameleonForConditionalGeneration` directory."""

from __future__ import annotations

from pathlib import Path

import torch
# at import, so a test module that uses these fails, never skips, without the reference installed
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast

from mmtok.chameleon import image_token_name

CODEBOOK, RES, TPI = 256, 64, 64  # channel_multiplier (1, 2, 2, 4): 8 x 8 codes per 64 px image
VQ = dict(embed_dim=16, num_embeddings=CODEBOOK, latent_channels=16, resolution=RES, base_channels=32,
          channel_multiplier=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8])
TEXTS = ["the cat sat on the mat", "A dog ran in the park.", "héllo wörld 你好 🙂", "  two  spaces\r\nand a tab\t!"]


def text_tokenizer():
    """A byte-level BPE laid out as Chameleon's: <s> <pad> </s> <unk>, the image tokens
    IMGIMG<letters>Z for codes 0..255 (ids 4..259), <eoss> <racm3:break> <image>, text pieces."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(CODEBOOK)]
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials + ["<eoss>", "<racm3:break>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return tok


def save_chameleon(out: Path, tok, seed: int = 0, randomize: bool = False, **config):
    """Build, save (with its tokenizer files) and return a tiny ChameleonForConditionalGeneration.
    `randomize` redraws every weight of the language model at a scale where logits spread
    over several units and norm gains and biases differ from 1 and 0, so a parity test
    sees each tensor and each layout detail."""
    torch.manual_seed(seed)
    cfg = ChameleonConfig(**{**dict(vocab_size=tok.get_vocab_size(),  # as Chameleon: exactly the tokenizer's ids
                                    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, vocabulary_map=tok.get_vocab(),
                                    image_token_id=tok.token_to_id("<image>"), bos_token_id=0, pad_token_id=1,
                                    eos_token_id=2, vq_config=VQ), **config})
    model = ChameleonForConditionalGeneration(cfg).eval()
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("model.vqmodel."):
                    continue
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith("norm.bias"):
                    p.uniform_(-0.5, 0.5)
                else:
                    p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(out)
    return model
