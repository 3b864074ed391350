"""The chunked LM loss (lmforge.train.losses) against the written-out unchunked formula: values, gradients,
softcap, z-loss, -100 labels, tied heads, LoRA-wrapped heads, no-grad evaluation, bf16 autocast, and
that no (tokens × vocab) tensor is kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.config import ModelConfig
from lmforge.models.lora import LoRALinear
from lmforge.models.transformer import build_model
from lmforge.train.losses import CausalLMLoss, accepts_loss_head, causal_lm_loss, head_path, lm_head_loss

B, T, D, V = 2, 9, 16, 96


def reference(h, weight, y, softcap=None, z_loss=0.0):
    """Σ CE (+ Σ z·lse²) of the whole logits at once, autograd through it."""
    logits = (h @ weight.t()).float()  # (B, T, V)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)
    lse = torch.logsumexp(logits, dim=-1)
    return ce + z_loss * (lse.square() * (y != -100)).sum()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :4] = -100  # prompt positions (SFT) carry no target
    y[1, -1] = -100
    return h, y


def grads_of(fn, h, head):
    h = h.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = fn(h)
    loss.backward()
    return loss.detach(), h.grad, head.weight.grad


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_fused_chunks_equal_the_unchunked_loss_and_gradients(softcap, z_loss, chunk):
    h, y = inputs()
    head = nn.Linear(D, V, bias=False)
    assert head_path(head) == "fused"
    got = grads_of(lambda x: lm_head_loss(x, head, y, chunk=chunk, softcap=softcap, z_loss=z_loss)[0], h, head)
    want = grads_of(lambda x: reference(x, head.weight, y, softcap, z_loss), h, head)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-5)


def test_z_sum_is_the_z_part_and_ce_is_the_rest():
    h, y = inputs(1)
    head = nn.Linear(D, V, bias=False)
    loss, z = lm_head_loss(h, head, y, chunk=4, z_loss=1e-2)
    ce_only, z0 = lm_head_loss(h, head, y, chunk=4)
    lse = torch.logsumexp((h @ head.weight.t()).float(), dim=-1)
    torch.testing.assert_close(z, 1e-2 * (lse.square() * (y != -100)).sum())
    torch.testing.assert_close(loss - z, ce_only)
    assert float(z0) == 0.0 and not z.requires_grad


def test_a_lora_wrapped_head_takes_the_checkpointed_path_with_equal_gradients():
    h, y = inputs(2)
    base = nn.Linear(D, V, bias=False)
    head = LoRALinear.from_linear(base, rank=4, alpha=8.0, dropout=0.0)
    nn.init.normal_(head.lora_B)  # a non-zero adapter update
    assert head_path(head) == "checkpointed"
    params = [p for p in head.parameters() if p.requires_grad]

    def run(fn):
        x = h.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        fn(x).backward()
        return [x.grad] + [p.grad.clone() for p in params]

    got = run(lambda x: lm_head_loss(x, head, y, chunk=4, softcap=3.0, z_loss=1e-3)[0])
    want = run(lambda x: lm_head_loss(x, head, y, chunk=0, softcap=3.0, z_loss=1e-3)[0])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-5)


def test_no_tokens_by_vocab_tensor_is_kept_for_backward():
    """The point of chunking: the fused and checkpointed paths keep nothing of the logits' size."""
    n_tok, dim, vocab = 64, 8, 512
    h = torch.randn(1, n_tok, dim, requires_grad=True)
    y = torch.randint(0, vocab, (1, n_tok))
    heads = {"fused": nn.Linear(dim, vocab, bias=False),
             "checkpointed": LoRALinear.from_linear(nn.Linear(dim, vocab, bias=False), 2, 4.0, 0.0)}
    for path, head in heads.items():
        for chunk, bound in ((8, 8 * vocab), (0, n_tok * vocab)):
            saved = []

            def pack(t, saved=saved):
                saved.append(t.numel())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = lm_head_loss(h, head, y, chunk=chunk)
            loss.backward()
            if chunk:  # at most one chunk's logits while the graph is built, none afterwards
                assert max(saved) < n_tok * vocab, (path, max(saved))
                assert max(saved) <= max(bound, vocab * dim), (path, max(saved))
            else:  # the unchunked reference does keep the whole logits (what the chunks avoid)
                assert max(saved) >= n_tok * vocab


def test_evaluation_without_grad_equals_the_training_value():
    h, y = inputs(3)
    head = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        ev, _ = lm_head_loss(h, head, y, chunk=4, softcap=5.0)
    tr, _ = lm_head_loss(h.requires_grad_(True), head, y, chunk=4, softcap=5.0)
    torch.testing.assert_close(ev, tr.detach())
    assert not ev.requires_grad


def test_bf16_autocast_stays_close_to_the_fp32_value():
    h, y = inputs(4)
    head = nn.Linear(D, V, bias=False)
    want = reference(h, head.weight, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = lm_head_loss(h.requires_grad_(True), head, y, chunk=4)
    got.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(got.detach(), want.detach(), rtol=2e-2, atol=0.0)


# ---- through the model ----------------------------------------------------------------------------
def tiny(tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=V, dim=D, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=32,
                       tie_embeddings=tie)


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_loss_in_chunks_equals_whole_logits_with_labels_and_doc_mask(tie):
    model = build_model(tiny(tie), seed=0)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (3, T + 1), generator=g)
    labels = tokens.clone()
    labels[:, :3] = -100
    docs = torch.tensor([0] * 4 + [1] * (T - 4))
    mask = (docs[:, None] == docs[None, :])[None, None].expand(3, 1, T, T)  # (B, 1, T, T): two documents
    batch = {"tokens": tokens, "labels": labels, "mask": mask}

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss, n = fn(model, batch)
        loss.backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    got, want = run(CausalLMLoss(chunk=4)), run(CausalLMLoss(chunk=0))
    # the unchunked path is the written-out formula on the model's logits
    with torch.no_grad():
        logits = model(tokens[:, :-1], mask=mask)
        formula = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(want[0], formula)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
    assert int(got[1]) == int(want[1]) == int((labels[:, 1:] != -100).sum())
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-5, atol=1e-6, msg=k)


def test_z_loss_trains_but_never_enters_the_validation_loss():
    model = build_model(tiny(False), seed=0)
    tokens = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(6))
    plain, zl = CausalLMLoss(chunk=4), CausalLMLoss(chunk=4, z_loss=1e-2)
    model.train()
    with torch.no_grad():
        h = model.hidden_states(tokens[:, :-1])
        lse = torch.logsumexp(model.output(h).float(), dim=-1)
    torch.testing.assert_close(zl(model, tokens)[0] - plain(model, tokens)[0], 1e-2 * lse.square().sum())
    model.eval()
    torch.testing.assert_close(zl(model, tokens)[0], plain(model, tokens)[0])


def test_the_models_logit_softcap_is_applied_in_the_chunks():
    model = build_model(tiny(True), seed=0)
    with torch.no_grad():
        model.output.weight.mul_(40.0)  # logits large enough for the cap to bind
    object.__setattr__(model.cfg, "logit_softcap", 2.0)  # the model-config key (set by the recipe options)
    tokens = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model.output(model.hidden_states(tokens[:, :-1])).float()
        capped = 2.0 * torch.tanh(logits / 2.0)
        want = F.cross_entropy(capped.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
        uncapped = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    got, _ = causal_lm_loss(model, tokens)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-5)
    assert abs(float(got.detach()) - float(uncapped)) > 1.0  # the cap changed the loss


def test_a_model_without_the_head_argument_uses_its_logits():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(V, D), nn.Linear(D, V)

        def forward(self, tokens, positions=None, mask=None):
            return self.out(self.emb(tokens))

    model = Plain()
    tokens = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(8))
    loss, n = causal_lm_loss(model, tokens)
    want = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, want)
    assert int(n) == 2 * T


def test_the_head_path_is_chosen_by_the_declared_attribute_not_the_signature():
    """A forward that merely has a ``head`` parameter gets whole logits; the Transformer (which declares
    ``accepts_loss_head``) gets the loss inside its forward, also under a ``.module`` wrapper (DDP)."""
    calls = []

    class TakesHead(nn.Module):  # a head= parameter, but no declaration: it must not be handed the loss
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(V, D), nn.Linear(D, V)

        def forward(self, tokens, positions=None, mask=None, head=None):
            calls.append(head)
            return self.out(self.emb(tokens))

    tokens = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(9))
    plain = TakesHead()
    assert not accepts_loss_head(plain)
    causal_lm_loss(plain, tokens)
    assert calls == [None]

    class Wrapper(nn.Module):  # like DDP: the model under .module, the forward passed through
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(kwargs.get("head"))
            return self.module(*args, **kwargs)

    model = build_model(tiny(True), seed=0)
    assert accepts_loss_head(model) and not accepts_loss_head(Wrapper(model))
    calls.clear()
    got, _ = causal_lm_loss(Wrapper(model), tokens)
    assert len(calls) == 1 and callable(calls[0])  # the chunked loss ran inside the forward
    with torch.no_grad():
        want = F.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("override,key", [("train.z_loss=-1e-4", "train.z_loss"), ("train.z_loss=nan", "train.z_loss"),
                                          ("train.loss_chunk_tokens=-1", "train.loss_chunk_tokens")])
def test_bad_loss_keys_are_config_errors_naming_the_key(override, key):
    from lmforge.config import ConfigError
    from lmforge.train.config import load_config

    base = {"model": {"preset": "tiny"}, "data": {"dir": "shards"},
            "train": {"global_batch": 8, "micro_batch": 8, "max_steps": 1}}
    cfg = load_config(None, ["train.z_loss=1e-4", "train.loss_chunk_tokens=0"], base=base)
    assert (cfg.train.z_loss, cfg.train.loss_chunk_tokens) == (1e-4, 0)
    assert CausalLMLoss.from_config(cfg.train).chunk == 0
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override], base=base)
