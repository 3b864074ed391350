"""Masked-LM pretraining of an encoder (``train.objective: mlm``, BERT): the pretraining task with a mask id
(the tokenizer's, or one extra vocabulary row), an injected MLM head (``model.mlm``), the masked-LM loss
(`lmforge.train.losses.MaskedLMLoss`) and a RUN/model that keeps the head in ``heads.safetensors``."""

from __future__ import annotations

from lmforge.artifacts.heads_dir import save_model_dir_with_heads
from lmforge.models.heads import attach_mlm_head, mask_token_id
from lmforge.tasks.pretrain import PretrainTask, resolve_tokenizer_dir
from lmforge.tokenizer.core import load_tokenizer
from lmforge.train.losses import MaskedLMLoss


class MLMTask(PretrainTask):
    name = "mlm"
    unit = "tokens"

    def check(self) -> None:
        super().check()
        cfg = self.cfg
        tok_dir = resolve_tokenizer_dir(cfg, self.index)
        tok = load_tokenizer(tok_dir) if tok_dir else None
        self.mask_id, need = mask_token_id(tok, self.data_vocab)
        if self.mcfg.vocab_size < need:  # one extra row for a mask token the tokenizer lacks
            cfg.model = {**cfg.model, "vocab_size": need}
            self.mcfg = cfg.model_config()
        self.special_ids = sorted(set(tok.special_tokens.values())) if tok else []

    def whole_model_first(self) -> bool:
        return True  # the head is injected into the whole model before it is parallelized

    def build_model(self, world, device, resume_from):
        model = super().build_model(world, device, resume_from)
        attach_mlm_head(model, seed=self.cfg.train.seed)
        return model

    def loss(self, model):
        return MaskedLMLoss(self.mask_id, self.mcfg.vocab_size, self.special_ids, seed=self.cfg.train.seed)

    def save_model(self, model, out) -> None:
        save_model_dir_with_heads(model, out, tokenizer_dir=self.tokenizer_dir, extra=self.extra)


__all__ = ["MLMTask"]
