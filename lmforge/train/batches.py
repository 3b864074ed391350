"""What the training loop does with a batch: the causal-LM loss, micro-batch splitting, device moves, and
how many input tokens a batch feeds the forward pass (the throughput count)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from lmforge.train.loss import lm_head_loss, loss_terms

DEFAULT_LOSS_CHUNK = 1024  # tokens per chunk of the LM-head loss (train.loss_chunk_tokens)


def input_tokens(batch: Any) -> int:
    """Input positions of a batch that hold a real token (what the forward pass processes).

    Causal rows (B, T+1) feed T inputs; a dict may say it explicitly: ``input_tokens`` (B,) per row
    (SFT), ``lengths`` (B,) (classification); otherwise every position of ``tokens`` (B, T+1) but the last.
    """
    return int(count_input_tokens(batch))


def count_input_tokens(batch: Any) -> torch.Tensor | int:
    """`input_tokens` without reading a device value back: a 0-d tensor where the count lives in one (the
    training loop sums these on the device and synchronizes once per step), else a Python int."""
    if isinstance(batch, dict):
        for key in ("input_tokens", "lengths"):
            if torch.is_tensor(batch.get(key)):
                return batch[key].sum()
        batch = batch["tokens"]
    return int(batch.size(0) * (batch.size(1) - 1)) if batch.dim() == 2 else int(batch.numel())


class CausalLMLoss:
    """``loss_fn(model, batch) -> (loss_sum, n_targets)``: next-token cross-entropy, summed, computed in
    chunks of ``chunk`` tokens from the final hidden states (`lmforge.train.loss`; 0 = whole logits at once),
    plus ``z_loss`` · logsumexp² per target while the model trains (never in evaluation, so validation loss
    stays pure cross-entropy). The model's ``logit_softcap`` (when its config has one) is applied per chunk.

    batch: tokens (B, T+1), or a dict with ``tokens`` and optional ``mask`` (bool (B, 1, T, T)),
    ``positions`` (B, T) and ``labels`` (B, T+1; -100 = not a target).
    """

    def __init__(self, chunk: int = DEFAULT_LOSS_CHUNK, z_loss: float = 0.0):
        self.chunk, self.z_loss = int(chunk), float(z_loss)

    @classmethod
    def from_config(cls, train_cfg) -> CausalLMLoss:
        """From the ``train`` section's ``loss_chunk_tokens`` and ``z_loss``."""
        return cls(getattr(train_cfg, "loss_chunk_tokens", DEFAULT_LOSS_CHUNK), getattr(train_cfg, "z_loss", 0.0))

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        mask = positions = labels = doc_ids = None
        if isinstance(batch, dict):
            tokens, mask, positions, labels, doc_ids = (batch["tokens"], batch.get("mask"), batch.get("positions"),
                                                        batch.get("labels"), batch.get("doc_ids"))
        else:
            tokens = batch
        inputs = tokens[:, :-1]  # (B, T)
        targets = (labels if labels is not None else tokens)[:, 1:]  # (B, T)
        loss = next_token_loss(model, inputs, targets, positions=positions, mask=mask, chunk=self.chunk,
                               z_loss=self.z_loss, doc_ids=doc_ids)
        return loss, (targets != -100).sum()


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, positions=None, mask=None,
                    chunk: int = DEFAULT_LOSS_CHUNK, z_loss: float = 0.0, doc_ids=None) -> torch.Tensor:
    """Σ cross-entropy (+ Σ z-loss while training) of ``model`` on inputs (B, T) against targets (B, T)
    (-100 = not a target). A model whose forward takes ``head=`` (the lmforge Transformer, also under
    FSDP2/DDP/TP) gets the chunked loss inside its forward; any other model's logits are used whole.

    ``doc_ids`` (B, T) (packed documents; instead of ``mask``): the attention mask is built from them here,
    on their device — a FlexAttention block mask on CUDA, the dense bool mask elsewhere
    (`lmforge.models.masks.document_attention_mask`)."""
    z_loss = z_loss if model.training else 0.0
    core = _unwrap(model)
    if doc_ids is not None and mask is None:
        from lmforge.models.masks import document_attention_mask

        mcfg = getattr(core, "cfg", None)
        mask = document_attention_mask(doc_ids[:, :inputs.size(1)], causal=getattr(mcfg, "causal", True),
                                       window=getattr(mcfg, "sliding_window", None))
    softcap = getattr(getattr(core, "cfg", None), "logit_softcap", None) or None
    if _takes_head(core):
        def head(h, output):
            return lm_head_loss(h, output, targets, chunk=chunk, softcap=softcap, z_loss=z_loss)[0]

        return model(inputs, positions=positions, mask=mask, head=head)
    logits = model(inputs, positions=positions, mask=mask)  # (B, T, V)
    if softcap:  # the model's forward applies the cap itself
        softcap = None
    ce, z = loss_terms(logits.flatten(0, 1), targets.flatten(), softcap, z_loss)
    return ce + z


def causal_lm_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, summed (the default ``CausalLMLoss``: chunked, no z-loss); see there."""
    return _DEFAULT(model, batch)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _takes_head(model: nn.Module) -> bool:
    return "head" in _forward_params(type(model))


def split_micro(batch: Any, micro: int) -> list[Any]:
    """Cut a step's batch into micro-batches of ``micro`` rows (tensors or dicts of tensors)."""
    if isinstance(batch, dict):
        n = next(iter(v for v in batch.values() if torch.is_tensor(v))).size(0)
        return [{k: (v[i:i + micro] if torch.is_tensor(v) and v.dim() and v.size(0) == n else v)
                 for k, v in batch.items()} for i in range(0, n, micro)]
    return list(batch.split(micro, dim=0))


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


_DEFAULT = CausalLMLoss()
