"""Parity with TRL's GRPOTrainer: on a tiny random `transformers` Llama and the same prompts, completions,
advantages, old and reference log-probs, lmforge's GRPO loss (`lmforge.train.losses.GRPOLoss`) and the
gradient of one weight matrix equal TRL's ``GRPOTrainer._compute_loss`` within 1e-5, for every loss_type
TRL and lmforge share (grpo, bnpo, dr_grpo), with and without the KL term and with old log-probs that
differ from the policy's (num_iterations > 1, so the clip is active), with TRL's
``use_bias_correction_kl`` on and off.

TRL runs its own loss code on a real `GRPOTrainer` (built with a reward function, never trained);
lmforge gets the same weights through `lmforge import`. Both sides run in float32."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import V, make_hf_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

B, P, C, G = 4, 5, 6, 2  # completions, prompt length, longest completion, group size
TEMPERATURE = 0.7


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _lmforge(hf_model, path):
    from lmforge.artifacts.hf.convert import import_hf
    from lmforge.artifacts.model_dir import load_model_dir

    hf_model.save_pretrained(path / "hf")
    import_hf(path / "hf", path / "lm")
    return load_model_dir(path / "lm")


def _trainer(tmp_path, policy, loss_type, beta, correction):
    from trl import GRPOConfig, GRPOTrainer

    # built with beta=0 (beta != 0 would load a reference from the model's hub name); the reference log-probs
    # are an input of `_compute_loss`, so its beta is set afterwards
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, num_generations=G,
                      max_completion_length=C, temperature=TEMPERATURE, beta=0.0, epsilon=0.2,
                      loss_type=loss_type, report_to="none", use_cpu=True, bf16=False, seed=0)
    ds = datasets.Dataset.from_list([{"prompt": "w1 w2"}] * 4)
    trainer = GRPOTrainer(model=policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=ds, processing_class=_tokenizer())
    trainer.beta = beta
    trainer.args.use_bias_correction_kl = correction
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _data():
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, V, (B // G, P), generator=g).repeat_interleave(G, 0)  # a group shares its prompt
    lengths = [6, 3, 5, 1]  # completions of different lengths: the loss types average differently
    completions = torch.zeros(B, C, dtype=torch.long)
    mask = torch.zeros(B, C, dtype=torch.long)
    for i, n in enumerate(lengths):
        completions[i, :n] = torch.randint(3, V, (n,), generator=g)
        mask[i, :n] = 1
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5])
    return prompts, completions, mask, advantages


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta,correction", [(0.0, True), (0.04, True), (0.04, False)])
def test_loss_and_gradient_equal_trl(tmp_path, loss_type, beta, correction):
    from lmforge.train.losses import IGNORE, GRPOLoss, completion_logps

    policy = make_hf_model("llama-mha-untied", seed=0)
    ref = make_hf_model("llama-mha-untied", seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the policy has moved away from its reference
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ours_policy, ours_ref = _lmforge(policy, tmp_path / "policy"), _lmforge(ref, tmp_path / "ref")
    prompts, completions, mask, advantages = _data()

    # lmforge's batch: prompt + completion per row, right-padded; targets are the shifted completion tokens
    tokens = torch.cat([prompts, completions], 1)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, P - 1:-1] = torch.where(mask.bool(), completions, IGNORE)
    with torch.no_grad():
        ref_logps = completion_logps(ours_ref(tokens), targets, TEMPERATURE)
        cur = completion_logps(ours_policy(tokens), targets, TEMPERATURE)
    # old log-probs that differ from the policy's by up to ±0.5: ratios on both sides of the clip region
    old = cur + (torch.rand(cur.shape, generator=g) - 0.5) * (targets != IGNORE)

    trainer = _trainer(tmp_path, policy, loss_type, beta, correction)
    trl_inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
                  "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old[:, P - 1:-1]}
    if beta:
        trl_inputs["ref_per_token_logps"] = ref_logps[:, P - 1:-1]
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs)
    trl_loss.backward()
    trl_grad = policy.model.layers[0].mlp.down_proj.weight.grad.clone()

    loss_fn = GRPOLoss(loss_type, beta=beta, epsilon=0.2, temperature=TEMPERATURE, max_completion_length=C,
                       use_bias_correction_kl=correction)
    batch = {"tokens": tokens, "targets": targets, "advantages": advantages, "old_logps": old}
    if beta:
        batch["ref_logps"] = ref_logps
    ours_policy.train()
    loss_sum, n = loss_fn(ours_policy, batch)
    (loss_sum / n).backward()
    our_grad = ours_policy.layers[0].feed_forward.w2.weight.grad
    stats = loss_fn.take_stats()

    diff = abs(trl_loss.item() - (loss_sum / n).item())
    gdiff = float((our_grad - trl_grad).abs().max())
    print(f"GRPO parity {loss_type} beta={beta} kl-correction={correction}: |loss diff| {diff:.2e}, max |grad diff| {gdiff:.2e}")
    assert diff <= 1e-5, diff
    assert trl_grad.abs().max() > 1e-4  # a real gradient
    assert gdiff <= 1e-5, gdiff
    assert stats["clip_ratio"] > 0  # the clip region was left: the min() branch is exercised
    assert stats["clip_ratio"] == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)
    if beta:
        assert stats["kl"] > 0
        assert stats["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-6)
