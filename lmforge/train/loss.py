"""The language-model loss over the final hidden states, in chunks of tokens, so the fp32 logits of the
whole batch never exist at once (at a 32k–128k vocabulary they are the largest tensor of a step).

    loss_sum, z_sum = lm_head_loss(h, head, targets, chunk=1024, softcap=None, z_loss=0.0)

``h`` (B, T, dim) are the final norm's hidden states, ``head`` the model's LM head module
(``model.output``; tied to the embedding or not), ``targets`` (B, T) with -100 = not a target. Per chunk
of ``chunk`` tokens: logits = head(h_chunk) in fp32, optional soft-capping cap·tanh(logits/cap), then
cross-entropy (summed) and, when ``z_loss`` > 0, z_loss · logsumexp² (summed; PaLM's auxiliary loss
that keeps the softmax normalizer near 1). Three paths, chosen by what the head is:

- **fused** (a plain ``nn.Linear`` without bias or hooks: the pretraining head, tied or not): one autograd
  Function computes each chunk's loss AND its gradients for ``h`` and the head weight in the forward pass
  (softmax − one-hot, through the cap's derivative) and keeps only those two gradients (the size of ``h``
  and of the weight), never a chunk's logits; backward scales them by the incoming gradient. Three head
  matmuls per chunk, the same as the unchunked loss — no recomputation.
- **checkpointed** (any other head module: LoRA-wrapped, with hooks): each chunk calls the module under
  ``torch.utils.checkpoint``, so only the chunk's input is kept and its logits are recomputed in backward.
- **unchunked** (a tensor-parallel head, whose weight is a vocabulary- or sequence-sharded DTensor: its
  module's hooks gather the logits, so it cannot be split here): ``head(h)`` whole, then the same math.

Every path returns the same numbers (fp32: to ~1e-6) and the same gradients as the unchunked loss.
The caller must run this inside the model's forward (`Transformer.forward(..., head=...)`): FSDP2 gathers
the head's weight around that forward only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def lm_head_loss(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, *, chunk: int = 1024,
                 softcap: float | None = None, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, z_sum)`` over the targets != -100: loss_sum = Σ CE + Σ z_loss·lse² (the objective,
    differentiable), z_sum = the z-loss part alone (detached; Σ CE = loss_sum − z_sum).

    ``chunk`` tokens per piece (0 = the whole batch at once, the reference path)."""
    x = h.reshape(-1, h.size(-1))  # (N, dim)
    y = targets.reshape(-1)  # (N,)
    path = head_path(head) if chunk else "unchunked"
    if path == "unchunked":  # (under sequence parallel h is this rank's slice; the head returns every position)
        logits = head(h)  # (B, T, V)
        ce, z = loss_terms(logits.reshape(-1, logits.size(-1)), y, softcap, z_loss)
        return ce + z, z.detach()
    if path == "fused" and torch.is_grad_enabled() and (x.requires_grad or head.weight.requires_grad):
        return _FusedLinearCE.apply(x, head.weight, y, chunk, softcap, z_loss)
    if path == "fused":  # no gradient wanted (evaluation): the forward chunks only
        def piece(xc, yc):
            return torch.stack(loss_terms(F.linear(xc, head.weight), yc, softcap, z_loss))
    else:
        def piece(xc, yc):
            return torch.stack(loss_terms(head(xc), yc, softcap, z_loss))
    run = piece
    if torch.is_grad_enabled():  # keep each chunk's input only; its logits are recomputed in backward
        def run(xc, yc):
            return checkpoint(piece, xc, yc, use_reentrant=False)
    total = None
    for i in range(0, x.size(0), chunk):
        part = run(x[i:i + chunk], y[i:i + chunk])  # (2,): Σ CE, Σ z of the chunk
        total = part if total is None else total + part
    return total[0] + total[1], total[1].detach()


def head_path(head: nn.Module) -> str:
    """``fused`` | ``checkpointed`` | ``unchunked`` for this head module (see the module docstring)."""
    weight = getattr(head, "weight", None)
    if weight is not None and _is_dtensor(weight):
        return "unchunked"
    if (type(head) is nn.Linear and head.bias is None and not head._forward_hooks
            and not head._forward_pre_hooks):
        return "fused"
    return "checkpointed"


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = logits.float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def loss_terms(logits: torch.Tensor, y: torch.Tensor, softcap: float | None,
                z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, Σ z_loss · lse²) of logits (n, V) against y (n,) — the reference math, autograd through it."""
    s = _capped(logits, softcap)
    ce = F.cross_entropy(s, y, reduction="sum", ignore_index=IGNORE)
    if not z_loss:
        return ce, ce.new_zeros(())
    lse = torch.logsumexp(s, dim=-1)  # (n,)
    return ce, z_loss * (lse.square() * (y != IGNORE)).sum()


class _FusedLinearCE(torch.autograd.Function):
    """(Σ CE + Σ z-loss, Σ z-loss) of ``softcap(x Wᵀ)``, chunk by chunk, with d/dx and d/dW computed in
    forward; the second output is a report (no gradient flows through it)."""

    @staticmethod
    def forward(ctx, x, weight, y, chunk, softcap, z_loss):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            xs, w = x.to(dtype), weight.to(dtype)
            grad_x = torch.empty_like(x) if need_x else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            ce_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            z_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            for i in range(0, x.size(0), chunk):
                xc, yc = xs[i:i + chunk], y[i:i + chunk]  # (n, dim), (n,)
                g, ce, z = _chunk_forward_backward(xc @ w.t(), yc, softcap, z_loss)  # g = d loss / d logits
                ce_sum += ce
                z_sum += z
                if need_x:
                    grad_x[i:i + chunk] = g.to(dtype) @ w  # (n, dim)
                if need_w:  # (V, dim), accumulated in fp32
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), xc)
                    else:
                        grad_w += g.to(dtype).t() @ xc
        ctx.save_for_backward(grad_x, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(z_sum)
        return ce_sum + z_sum, z_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        grad_x, grad_w = ctx.saved_tensors  # d(Σ CE + Σ z)/dx and /dW, scaled by the incoming gradient
        out_x = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
        out_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return out_x, out_w, None, None, None, None


@torch.no_grad()
def _chunk_forward_backward(logits: torch.Tensor, y: torch.Tensor, softcap: float | None,
                            z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d(Σ CE + Σ z)/d logits (n, V) fp32, Σ CE, Σ z) for one chunk, written out.

    With s = cap·tanh(logits/cap) (or s = logits) and lse = logsumexp(s):
      CE = lse − s[y],  z = coef·lse²,  d/ds = softmax(s)·(1 + 2·coef·lse) − onehot(y),
      d/d logits = d/ds · (1 − tanh²)   (the cap's derivative),   rows with y = -100 contribute nothing.
    """
    raw = logits.float()
    t = torch.tanh(raw / softcap) if softcap else None
    s = softcap * t if softcap else raw  # (n, V)
    valid = y != IGNORE  # (n,)
    yc = torch.where(valid, y, 0)
    target_s = s.gather(1, yc[:, None]).squeeze(1)  # (n,)
    peak = s.amax(dim=-1)  # (n,)
    g = s.sub_(peak[:, None]).exp_()  # exp(s - max), in place of s: (n, V); no other (n, V) buffer
    sumexp = g.sum(dim=-1)  # (n,)
    lse = peak + sumexp.log()  # logsumexp(s): (n,)
    ce = ((lse - target_s) * valid).sum()
    z = (z_loss * lse.square() * valid).sum() if z_loss else lse.new_zeros(())
    row = valid.to(g.dtype) / sumexp  # softmax = exp(s - max) / Σ; rows without a target get 0
    if z_loss:
        row = row * (1.0 + 2.0 * z_loss * lse)
    g.mul_(row[:, None])
    g.scatter_add_(1, yc[:, None], -valid.to(g.dtype)[:, None])
    if softcap:
        g.mul_(1.0 - t.square())
    return g, ce, z
