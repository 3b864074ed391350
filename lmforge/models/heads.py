"""Heads injected on top of an encoder backbone (BERT-style), kept outside the Transformer.

- `MLMHead`: BertForMaskedLM's prediction head — dense → activation → LayerNorm → decoder tied to the
  token embeddings, plus a per-token output bias.
- `Pooler`: BertModel's pooler — tanh(dense(h[CLS])).
- `mask_tokens`: BERT's masking recipe (15% of tokens; 80% → [MASK], 10% → random, 10% unchanged), a pure
  function the masked-LM loss (`lmforge.train.losses.MaskedLMLoss`) calls when ``objective: mlm``.

Heads are stored beside the backbone by `lmforge.artifacts.heads_dir` (``heads.safetensors``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import activation_fn

IGNORE_INDEX = -100


class MLMHead(nn.Module):
    """hidden (B, T, dim) → vocabulary logits (B, T, vocab); the decoder matrix is the token embedding."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.activation = "gelu" if cfg.activation == "swiglu" else cfg.activation
        self.dense = nn.Linear(cfg.dim, cfg.dim, **kw)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, **kw)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size, **kw))
        self.init_std = cfg.init_std

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        nn.init.trunc_normal_(self.dense.weight, std=self.init_std, a=-3 * self.init_std, b=3 * self.init_std,
                              generator=generator)
        self.dense.bias.zero_()
        self.norm.weight.fill_(1.0)
        self.norm.bias.zero_()
        self.bias.zero_()

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(activation_fn(self.activation, self.dense(hidden)))  # (B, T, dim)
        return F.linear(h, embedding_weight, self.bias)  # (B, T, vocab)

    def resize(self, vocab_size: int) -> None:
        """Grow (or shrink) the output bias with the vocabulary; new entries start at zero."""
        with torch.no_grad():
            new = torch.zeros(vocab_size, device=self.bias.device, dtype=self.bias.dtype)
            n = min(vocab_size, self.bias.numel())
            new[:n] = self.bias[:n]
        self.bias = nn.Parameter(new)


class Pooler(nn.Module):
    """BERT's pooler: tanh(W h_[CLS] + b) → (B, dim)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


HEAD_CLASSES = {"mlm": MLMHead, "pooler": Pooler}


def mlm_logits(model: nn.Module, head: MLMHead, tokens: torch.Tensor, mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder + MLM head: tokens (B, T) → logits (B, T, vocab)."""
    h = model.hidden_states(tokens, mask=mask, token_type_ids=token_type_ids)
    return head(h, model.tok_embeddings.weight)


def mask_tokens(tokens: torch.Tensor, mask_id: int, vocab_size: int, special_ids=(), prob: float = 0.15,
                generator: torch.Generator | None = None, replace_prob: float = 0.8,
                random_prob: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking. Returns (inputs, labels): a ``prob`` fraction of the non-special tokens is selected;
    of those, ``replace_prob`` become ``mask_id``, ``random_prob`` a uniformly random token, the rest stay.
    ``labels`` holds the original id at selected positions and IGNORE_INDEX elsewhere. Pure: ``tokens`` is
    not modified."""
    if not 0.0 < prob < 1.0:
        raise UserError(f"mlm masking probability {prob} must be in (0, 1); BERT uses 0.15")
    if replace_prob + random_prob > 1.0:
        raise UserError("mlm replace_prob + random_prob must not exceed 1 (BERT: 0.8 + 0.1)")
    device = tokens.device

    def uniform() -> torch.Tensor:
        return torch.rand(tokens.shape, generator=generator, device=generator.device if generator else device).to(device)

    special = torch.zeros_like(tokens, dtype=torch.bool)
    for s in {int(i) for i in special_ids}:
        special |= tokens == s
    selected = (uniform() < prob) & ~special
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    r = uniform()
    to_mask = selected & (r < replace_prob)
    to_random = selected & (r >= replace_prob) & (r < replace_prob + random_prob)
    random_ids = torch.randint(vocab_size, tokens.shape, generator=generator,
                               device=generator.device if generator else device).to(device)
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


# ---- masked-LM pretraining (``train.objective: mlm``) ------------------------------------------------
MASK_NAMES = ("[MASK]", "<mask>", "<|mask|>")


def mask_token_id(tokenizer, vocab_size: int) -> tuple[int, int]:
    """(mask id, model vocab size): the tokenizer's mask token when it has one, else one extra id after
    its vocabulary (the model then needs ``vocab_size + 1`` rows)."""
    if tokenizer is not None:
        for name in MASK_NAMES:
            i = tokenizer.token_to_id(name)
            if i is not None:
                return i, vocab_size
    return vocab_size, vocab_size + 1


def attach_mlm_head(model: nn.Module, seed: int | None = None) -> MLMHead:
    """Inject an MLM head as ``model.mlm`` (its parameters train, checkpoint and shard with the model)."""
    w = model.tok_embeddings.weight
    head = MLMHead(model.cfg, device=w.device, dtype=w.dtype)
    gen = torch.Generator(device=w.device).manual_seed(seed) if seed is not None else None
    head.init_weights(gen)
    model.add_module("mlm", head)
    return head


