"""Modelling code of an `mmtok export --format hf` directory whose model transformers' own
Chameleon cannot compute (MoE, MoMa, Mixture-of-Depths, or mmtok's own QK-norm). The
export copies this file in as `modeling_mmtok.py` and names it in config.json's `auto_map`:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

It wraps mmtok's own decoder (mmtok must be installed where the model is loaded) and
routes causally: every expert-choice and depth router is replaced by its auxiliary
router, so a token's output depends on nothing after it, as a causal LM's must.
`attention_mask` marks padding (either side); each row is one document whose positions
start at its first real token. No KV cache: `generate` recomputes the prefix each step.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class MmtokConfig(PretrainedConfig):
    model_type = "mmtok"

    def __init__(self, mmtok_model: dict | None = None, **kwargs):
        self.mmtok_model = dict(mmtok_model or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class MmtokForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MmtokConfig
    base_model_prefix = "decoder"
    _supports_cache_class = False

    def __init__(self, config: MmtokConfig):
        super().__init__(config)
        from mmtok.trainer.config import ModelConfig
        from mmtok.trainer.model import Decoder

        self.decoder = Decoder(ModelConfig(**config.mmtok_model))
        self.post_init()

    def _init_weights(self, module):
        """The weights come from the checkpoint; only the rotary table, a buffer that is
        computed rather than saved, is made here (transformers builds models on the meta
        device, so the decoder's own is never filled)."""
        from mmtok.trainer.attention import rotary_table
        from mmtok.trainer.model import Decoder

        if isinstance(module, Decoder):
            c = module.cfg
            with torch.no_grad():
                module.rope = rotary_table(c.d_model // c.n_heads, c.max_seq_len, c.rope_theta).to(module.rope.device)

    def get_input_embeddings(self):
        return self.decoder.embed

    def get_output_embeddings(self):
        return self.decoder.head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        logits, _ = self.decoder(input_ids, positions, real.long(), routing="causal")
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
