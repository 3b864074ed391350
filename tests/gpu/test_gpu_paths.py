"""CUDA-only checks of the paths that only run on a GPU (skipped without CUDA; bench/gpu_check.sh runs them):
document masks through FlexAttention (forward and backward, against the dense mask through SDPA), the
serving batcher, LoRA on a bf16 base, and evaluation's chunked / on-device scoring against the CPU.

(lmforge has no QLoRA training path: the planner plans it, nothing trains it; nothing to run here.)
"""

from __future__ import annotations

import pytest
import torch

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model

pytestmark = pytest.mark.gpu

SMALL = {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
         "max_seq_len": 256}


@pytest.fixture(autouse=True)
def _cuda_exact():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # compare fp32 paths without TF32 rounding
    yield
    torch.set_float32_matmul_precision(before)


def test_document_mask_flex_matches_dense_forward_and_backward():
    from lmforge.models.masks import document_attention_mask, document_mask_dense, is_block_mask
    from lmforge.train.losses import next_token_loss

    cfg = ModelConfig(**SMALL)
    doc = torch.tensor([[0] * 40 + [1] * 70 + [2] * 18, [0] * 100 + [1] * 28], device="cuda")
    assert is_block_mask(document_attention_mask(doc))  # CUDA: FlexAttention
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 129), device="cuda", generator=g)
    grads, losses = [], []
    for how in ("flex", "dense"):
        model = build_model(cfg, device="cuda", seed=0)
        kw = {"doc_ids": doc} if how == "flex" else {"mask": document_mask_dense(doc)}
        loss = next_token_loss(model, tokens[:, :-1], tokens[:, 1:], **kw)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_serving_batcher_on_cuda_equals_generate():
    from lmforge.generate.batcher import ContinuousBatcher, SamplingParams, Sequence
    from lmforge.generate.engine import generate

    model = build_model(ModelConfig(**SMALL), device="cuda", seed=0).eval()
    prompts = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4, 3]]
    batcher = ContinuousBatcher(model, n_slots=2, max_len=64)
    seqs = [Sequence(p, SamplingParams(max_new_tokens=10)) for p in prompts]
    waiting = list(seqs)
    while waiting or batcher.active:
        while waiting and batcher.free_slots:
            batcher.add(waiting.pop(0))
        batcher.step()
    for s, p in zip(seqs, prompts):
        assert s.out == generate(model, p, max_new_tokens=10)


def test_lora_on_a_bf16_base_trains_under_autocast():
    from lmforge.models.lora import LoraConfig, apply_lora
    from lmforge.train.losses import next_token_loss

    cfg = ModelConfig(**SMALL)
    model = build_model(cfg, device="cuda", seed=0, dtype=torch.bfloat16)
    apply_lora(model, LoraConfig(rank=8, targets=["wq", "wv"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (4, 65), device="cuda", generator=g)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = next_token_loss(model, tokens[:, :-1], tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses  # CPU bf16: 5.56 -> 5.34 over these 30 steps


def test_choice_scores_on_cuda_equal_the_cpu():
    from lmforge.eval.choice import score_continuations

    cfg = ModelConfig(**SMALL)
    cpu = build_model(cfg, seed=0).eval()
    gpu = build_model(cfg, device="cuda", seed=0).eval()
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randint(0, 256, (n,), generator=g).tolist(), torch.randint(0, 256, (m,), generator=g).tolist())
             for n, m in ((5, 3), (30, 1), (12, 7))]
    a, b = score_continuations(cpu, pairs, batch_size=2), score_continuations(gpu, pairs, batch_size=2)
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-3) and ga == gb
