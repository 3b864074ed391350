"""Parity with TRL's DPOTrainer: on a tiny random `transformers` Llama and the same batch, lmforge's sigmoid and
IPO losses and the gradient of one weight matrix equal TRL's within 1e-5.

TRL runs for real (its tokenization, collator, forward and loss through ``DPOTrainer.compute_loss``); lmforge
gets the very token ids TRL produced and the same weights through `lmforge import`.
TRL's config defaults to ``bf16=True``, which casts its reference model to bfloat16; the test runs both sides
in float32 (``bf16=False``) so a 1e-5 comparison means something."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import V, make_hf_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _rows(n=6):
    g = torch.Generator().manual_seed(1)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, V - 3, (k,), generator=g))

    # prompts and completions of different lengths, so padding and per-length normalisation both matter
    return [{"prompt": words(3 + i), "chosen": " " + words(2 + i % 3), "rejected": " " + words(5 - i % 2)}
            for i in range(n)]


def _lmforge(hf_model, path):
    from lmforge.artifacts.hf.convert import import_hf
    from lmforge.artifacts.model_dir import load_model_dir

    hf_model.save_pretrained(path / "hf")
    import_hf(path / "hf", path / "lm")
    return load_model_dir(path / "lm")


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_loss_and_gradient_equal_trl(tmp_path, loss_type, beta):
    from trl import DPOConfig, DPOTrainer

    from lmforge.data.preference_pairs import EncodedPairs, collate_pairs
    from lmforge.tasks.preference import PreferenceLoss

    policy = make_hf_model("llama-mha-untied", seed=0)
    ref = make_hf_model("llama-mha-untied", seed=0)  # the same weights, built again
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the policy has moved away from its reference
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ours_policy, ours_ref = _lmforge(policy, tmp_path / "policy"), _lmforge(ref, tmp_path / "ref")

    rows = _rows()
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), beta=beta,
                     loss_type=[loss_type], report_to="none", use_cpu=True, max_length=None, seed=0,
                     bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))  # every pair, in the sampler's order
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grad = policy.model.layers[0].mlp.down_proj.weight.grad.clone()

    ds = trainer.train_dataset
    data = EncodedPairs([list(r["prompt_ids"]) for r in ds], [list(r["chosen_ids"]) for r in ds],
                        [list(r["rejected_ids"]) for r in ds])
    assert all(c[-1] == 2 and r[-1] == 2 for c, r in zip(data.chosen, data.rejected))  # TRL appended EOS
    ours = collate_pairs(data, list(range(len(rows))), pad_id=0)
    loss_fn = PreferenceLoss(loss_type, beta=beta, reference="copy", ref_model=ours_ref, pad_id=0)
    ours_policy.train()
    loss_sum, n = loss_fn(ours_policy, ours)
    (loss_sum / n).backward()
    our_grad = ours_policy.layers[0].feed_forward.w2.weight.grad

    assert trl_loss.item() == pytest.approx((loss_sum / n).item(), abs=1e-5)
    assert abs(trl_loss.item() - 0.6931) > 1e-3  # not the trivial policy == reference value
    assert trl_grad.abs().max() > 1e-4  # a real gradient
    assert torch.allclose(our_grad, trl_grad, atol=1e-5, rtol=0), float((our_grad - trl_grad).abs().max())
