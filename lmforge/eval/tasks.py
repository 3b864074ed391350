"""Running a model over evaluation data: batched generation through the chat template (QA,
summarization, translation) and classification (a fine-tuned head, or zero-shot label likelihood).

Every function here is deterministic for a fixed seed and batch size: greedy decoding by default, and a
sampling seed derived from ``seed`` and the batch index otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.config import UserError
from lmforge.eval.datasets import GenExample
from lmforge.generate.engine import GenerationConfig, generate_ids
from lmforge.tokenizer.chat_template import encode_prompt, encode_text, uses_bos

# ---- prompts ---------------------------------------------------------------------------------------
PROMPTS = {
    "qa_context": "Answer the question using the passage. Reply with a short answer only.\n\n"
                  "Passage: {context}\n\nQuestion: {question}",
    "qa": "Answer the question with a short answer only.\n\nQuestion: {question}",
    "summarize": "Summarize the following text in one sentence.\n\n{source}",
    "translate": "Translate the following {src_name} text into {tgt_name}.\n\n{source}",
}
# The field a too-long prompt is shortened in (the rest of the prompt is kept whole).
LONG_FIELD = {"qa": "context", "summarize": "source", "translate": "source"}


class _Fields(dict):
    def __missing__(self, key):
        raise UserError(f"prompt template uses {{{key}}} but the examples have only "
                        f"{', '.join('{' + k + '}' for k in self)}; fix --prompt")


def fill(template: str, fields: dict[str, str]) -> str:
    try:
        return template.format_map(_Fields(fields))
    except (ValueError, IndexError) as e:
        raise UserError(f"prompt template is not a valid format string ({e}); use {{field}} placeholders "
                        "and double braces for literal ones") from None


def prompt_template(task: str, example: GenExample, custom: str | None = None) -> str:
    if custom:
        return custom
    if task == "qa":
        return PROMPTS["qa_context" if "context" in example.fields else "qa"]
    return PROMPTS[task]


def postprocess(task: str, text: str) -> str:
    """QA and translation answers are one line; a summary keeps its first paragraph."""
    text = text.strip()
    if task in ("qa", "translate"):
        return next((line.strip() for line in text.splitlines() if line.strip()), "")
    return text.split("\n\n")[0].strip()


# ---- building prompts that fit ---------------------------------------------------------------------
@dataclass
class PromptBuilder:
    tokenizer: object
    task: str
    max_prompt_tokens: int
    chat: bool = True
    template: str | None = None  # chat template (None: the tokenizer's)
    custom_prompt: str | None = None
    extra_fields: dict[str, str] | None = None

    def _ids(self, text: str) -> list[int]:
        if self.chat:
            return encode_prompt(self.tokenizer, [{"role": "user", "content": text}], self.template)
        bos = [self.tokenizer.bos_id] if uses_bos(self.tokenizer, self.template) else []
        return bos + encode_text(self.tokenizer, text)

    def __call__(self, example: GenExample) -> tuple[list[int], bool]:
        """Prompt ids for ``example`` and whether its long field had to be shortened to fit."""
        fields = {**(self.extra_fields or {}), **example.fields}
        template = prompt_template(self.task, example, self.custom_prompt)
        ids = self._ids(fill(template, fields))
        if len(ids) <= self.max_prompt_tokens:
            return ids, False
        long_field = LONG_FIELD.get(self.task)
        if long_field in fields:
            base = len(self._ids(fill(template, {**fields, long_field: ""})))
            budget = self.max_prompt_tokens - base
            if budget > 0:
                cut = encode_text(self.tokenizer, fields[long_field])[:budget]
                for _ in range(4):  # decoding + re-encoding can shift a token or two
                    ids = self._ids(fill(template, {**fields, long_field: self.tokenizer.decode(cut)}))
                    if len(ids) <= self.max_prompt_tokens or not cut:
                        break
                    cut = cut[: max(0, len(cut) - (len(ids) - self.max_prompt_tokens))]
        if len(ids) > self.max_prompt_tokens:  # last resort: keep the end, where the instruction/header is
            ids = ids[-self.max_prompt_tokens:]
        return ids, True


# ---- generation --------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                     seed: int = 0, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, progress=None) -> list[str]:
    """Batched KV-cache generation; prompts are sorted by length so batches pad little, and the answers
    are returned in the input order."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[str] = [""] * len(prompts)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed * 100_003 + b, eos_id=getattr(tokenizer, "eos_id", None))
        new = generate_ids(model, [list(prompts[i]) for i in idx], gen, tokenizer)
        for i, ids in zip(idx, new):
            out[i] = tokenizer.decode(ids)
        if progress is not None:
            progress.update(len(idx))
    return out


# ---- classification ------------------------------------------------------------------------------------
def _right_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return x, torch.tensor([len(s) for s in seqs], dtype=torch.long)


@torch.no_grad()
def classify_with_head(clf, ids: Sequence[list[int]], batch_size: int, pad_id: int = 0,
                       progress=None) -> list[int]:
    """Predicted label indices from a `SequenceClassifier` (right-padded batches, sorted by length)."""
    device = next(clf.parameters()).device
    clf.eval()
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    preds = [0] * len(ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, lengths = _right_pad([ids[i] for i in idx], pad_id)
        logits = clf(x.to(device), lengths.to(device))
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
        if progress is not None:
            progress.update(len(idx))
    return preds


@torch.no_grad()
def label_loglikelihoods(model, prompts: Sequence[list[int]], continuations: Sequence[list[int]],
                         batch_size: int, pad_id: int = 0, progress=None) -> list[list[float]]:
    """log p(continuation | prompt) for every prompt × continuation: a (N, L) list of summed log-probs.
    ``progress`` counts (prompt, continuation) rows.

    Each (prompt, continuation) pair is one right-padded row; causality keeps the padding out of the
    scored positions. Prompts are cut from the left to fit the model's context.
    """
    cfg = model.cfg
    if not cfg.causal or not cfg.lm_head:
        raise UserError("zero-shot classification needs a causal LM with an LM head; fine-tune a classifier "
                        "(finetune.mode=classify) for an encoder")
    device = next(model.parameters()).device
    longest = max(len(c) for c in continuations)
    if longest >= cfg.max_seq_len:
        raise UserError(f"a label encodes to {longest} tokens, as long as the model's context; use shorter "
                        "--label-words")
    rows = []
    for n, p in enumerate(prompts):
        p = list(p)[-(cfg.max_seq_len - longest):]
        for k, c in enumerate(continuations):
            rows.append((n, k, p, list(c)))
    scores = [[0.0] * len(continuations) for _ in prompts]
    order = sorted(range(len(rows)), key=lambda r: -(len(rows[r][2]) + len(rows[r][3])))
    per_prompt = len(continuations)
    for start in range(0, len(order), batch_size * per_prompt):
        chunk = [rows[r] for r in order[start:start + batch_size * per_prompt]]
        x, _ = _right_pad([p + c for _, _, p, c in chunk], pad_id)
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1).cpu()
        for b, (n, k, p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            scores[n][k] = float(logp[b, pos, torch.tensor(c)].sum())
        if progress is not None:
            progress.update(len(chunk))
    return scores


def zero_shot_classify(model, tokenizer, texts: Sequence[str], label_words: Sequence[str], batch_size: int,
                       prompt: str = "{text}\nAnswer:", progress=None,
                       build: Callable[[str], list[int]] | None = None) -> list[int]:
    """Pick, for each text, the label word the LM finds most likely after ``prompt``."""
    bos = [tokenizer.bos_id] if uses_bos(tokenizer) else []
    if build is None:
        def build(text: str) -> list[int]:
            return bos + encode_text(tokenizer, fill(prompt, {"text": text}))
    conts = [encode_text(tokenizer, " " + w.strip()) for w in label_words]
    if any(not c for c in conts):
        raise UserError("a label word encodes to no tokens; pass non-empty --label-words")
    if len({tuple(c) for c in conts}) < len(conts):
        raise UserError("two label words encode to the same tokens; pass distinct --label-words")
    scores = label_loglikelihoods(model, [build(t) for t in texts], conts, batch_size,
                                  getattr(tokenizer, "pad_id", None) or 0, progress)
    return [max(range(len(s)), key=lambda k: s[k]) for s in scores]
