"""Input embeddings: token embeddings plus what some families add before the first block — learned
(BERT, GPT-2) or sinusoidal absolute positions, √dim scaling (Gemma), and the BERT-only features:
token-type (segment) embeddings and a norm over the summed embeddings.

The modules are registered on the model itself (``pos_embeddings``, ``token_type_embeddings``,
``embedding_norm``) so checkpoint keys stay those of the HF-compatible layout; this file keeps their
construction and use in one place, out of the decoder's code path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.models.config import ModelConfig


def add_input_embeddings(model: nn.Module, cfg: ModelConfig, make_norm) -> None:
    """Register the token embedding and the optional position / token-type / norm modules on ``model``."""
    model.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
    if cfg.pos_encoding == "learned":
        model.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
    if cfg.type_vocab_size:  # BERT segments
        model.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
    if cfg.embedding_norm:  # BERT's LayerNorm over the summed embeddings
        model.embedding_norm = make_norm(cfg)


def embed_inputs(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (B, T), positions (B, T) -> (B, T, dim): the sum the first block sees (before dropout)."""
    cfg = model.cfg
    h = model.tok_embeddings(tokens)  # (B, T, dim)
    if cfg.embed_scale:
        h = h * math.sqrt(cfg.dim)
    if cfg.pos_encoding == "learned":
        h = h + model.pos_embeddings(positions)
    elif cfg.pos_encoding == "sinusoidal":
        h = h + model.sinusoidal[positions].to(h.dtype)
    if cfg.type_vocab_size:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(tokens)
        h = h + model.token_type_embeddings(token_type_ids)
    if cfg.embedding_norm:
        h = model.embedding_norm(h)
    return h
