"""Multiple choice by log-likelihood (`lmforge eval --task choice`), scored the way EleutherAI's
lm-evaluation-harness scores its ``multiple_choice`` tasks, so the numbers are comparable:

* each choice is a continuation ``" " + choice`` of the prompt (the harness's ``target_delimiter``);
  trailing spaces of the prompt move to the continuation, the prompt+continuation is encoded whole and the
  continuation's tokens are what follows the prompt's own encoding (``TemplateLM._encode_pair``);
* ``acc``: the choice with the highest summed log-probability; ``acc_norm``: divided by the choice's length
  in characters (lm-eval 0.4's ``acc_norm``); ``acc_bytes``: by its length in UTF-8 bytes (``acc_bytes``);
* prompts are the harness's own templates for MMLU (``Answer:``), C-Eval / CMMLU (``答案：``) and
  HellaSwag (its ``preprocess`` of the WikiHow brackets included).

Local files only (jsonl / json / csv). Layouts:

* MMLU: ``question``, ``A``..``D`` (or a ``choices`` list), ``answer`` (letter or index); the original
  header-less CSV ``question,A,B,C,D,answer`` too;
* C-Eval: ``question``, ``A``..``D``, ``answer`` (letter); CMMLU: ``Question``, ``A``..``D``, ``Answer``;
* HellaSwag: ``ctx`` (or ``ctx_a`` + ``ctx_b``, with ``activity_label``), ``endings``, ``label``.

``score_continuations`` (batched log-likelihood of token continuations) is shared with the harness
adapter (``lmforge.eval.harness``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.records import DataError, check_file, read_records, read_table
from lmforge.eval.text import has_cjk
from lmforge.models.transformer import logits_at

LAYOUTS = ("auto", "mmlu", "ceval", "cmmlu", "hellaswag")
LETTERS = "ABCDEFGHIJ"
PROMPT_END = {"mmlu": "Answer:", "ceval": "答案：", "cmmlu": "答案："}


@dataclass
class ChoiceExample:
    query: str  # the prompt (the harness's doc_to_text)
    choices: list[str]  # what is scored after " " (the harness's doc_to_choice)
    gold: int
    layout: str
    where: str = ""
    subject: str | None = None
    extra: dict = field(default_factory=dict)


# ---- data --------------------------------------------------------------------------------------------
def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: strip, WikiHow ``[title]`` → ``. ``, drop other brackets."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _gold(value, n: int, where: str, what: str) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n] and value.strip():
        return LETTERS.index(value.strip().upper())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 0 <= value < n:
        return value
    raise DataError(f"{where}: {what}={value!r} is not one of the {n} choices; use a letter "
                    f"{LETTERS[0]}-{LETTERS[n - 1]} or an index 0-{n - 1}")


def _letter_choices(rec: dict, where: str) -> list[str]:
    out = []
    for letter in LETTERS:
        if letter not in rec:
            break
        out.append(str(rec[letter]))
    if len(out) < 2:
        raise DataError(f"{where}: a multiple-choice record needs choices A, B, … (found {len(out)})")
    return out


def _example(rec: dict, where: str, layout: str) -> ChoiceExample:
    if "endings" in rec and layout in ("auto", "hellaswag"):
        endings = rec["endings"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise DataError(f"{where}: 'endings' must be a list of at least two strings")
        if "ctx_a" in rec:
            ctx = f"{rec['ctx_a']} {str(rec.get('ctx_b', '')).capitalize()}"
        elif "ctx" in rec:
            ctx = str(rec["ctx"])
        else:
            raise DataError(f"{where}: a HellaSwag record needs 'ctx' (or 'ctx_a' + 'ctx_b')")
        if rec.get("activity_label"):
            ctx = f"{rec['activity_label']}: {ctx}"
        return ChoiceExample(_hellaswag_preprocess(ctx), [_hellaswag_preprocess(e) for e in endings],
                             _gold(rec.get("label"), len(endings), where, "label"), "hellaswag", where)
    if layout == "hellaswag":
        raise DataError(f"{where}: --layout hellaswag needs 'ctx' and 'endings' fields")
    question_key = "Question" if "Question" in rec and "question" not in rec else "question"
    if question_key not in rec:
        keys = ", ".join(sorted(rec))
        raise DataError(f"{where}: no 'question' (MMLU / C-Eval), 'Question' (CMMLU) or 'ctx' + 'endings' "
                        f"(HellaSwag) field (found {keys})")
    question = str(rec[question_key])
    options = rec["choices"] if isinstance(rec.get("choices"), list) else _letter_choices(rec, where)
    options = [str(o) for o in options]
    answer_key = "Answer" if "Answer" in rec and "answer" not in rec else "answer"
    gold = _gold(rec.get(answer_key), len(options), where, answer_key)
    if layout == "auto":
        layout = "cmmlu" if question_key == "Question" else ("ceval" if has_cjk(question) else "mmlu")
    lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    query = "\n".join(lines) + "\n" + PROMPT_END[layout]
    return ChoiceExample(query, list(LETTERS[:len(options)]), gold, layout, where,
                         subject=rec.get("subject") if isinstance(rec.get("subject"), str) else None)


def load_choice(path: str, layout: str = "auto") -> list[ChoiceExample]:
    """Read a multiple-choice file (see the module docstring for the layouts)."""
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout} is not one of {', '.join(LAYOUTS)}")
    p = check_file(path)
    if p.suffix.lower() in (".csv", ".tsv"):
        records = _table_records(p)
    else:
        records = []
        for line, rec in read_records(p):
            if not isinstance(rec, dict):
                raise DataError(f"{p}:{line}: expected a JSON object, got {type(rec).__name__}")
            records.append((f"{p}:{line}", rec))
    examples = [_example(rec, where, layout) for where, rec in records]
    for ex in examples:
        if any(not c for c in ex.choices):
            raise DataError(f"{ex.where}: a choice is empty; every choice needs text (acc_norm divides by its length)")
    if not examples:
        raise DataError(f"'{p}' holds no examples")
    return examples


def _table_records(p: Path) -> list[tuple[str, dict]]:
    rows = list(read_table(p))
    if not rows:
        return []
    header = [c.strip() for c in rows[0][1]]
    known = {"question", "Question", "ctx", "ctx_a", "endings"}
    if known & set(header):
        return [(f"{p}:{line}", dict(zip(header, row))) for line, row in rows[1:]]
    if len(header) == 6:  # the original MMLU CSVs: question,A,B,C,D,answer without a header
        return [(f"{p}:{line}", dict(zip(("question", "A", "B", "C", "D", "answer"), row))) for line, row in rows]
    raise DataError(f"'{p}' has no header with question / A / B / … / answer columns and is not the "
                    "6-column MMLU layout (question,A,B,C,D,answer)")


# ---- scoring ---------------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's ``TemplateLM`` splits them: trailing spaces of the
    context go to the continuation; the whole text is encoded once and the continuation is what follows
    the context's encoding. An empty context becomes BOS (else EOS), as the harness does."""
    prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    if not context:
        cont = tokenizer.encode(continuation)
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return ([start], cont) if cont[:1] != [start] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = prefix + tokenizer.encode(context + continuation)
    ctx = prefix + tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score_continuations(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
                        max_length: int | None = None, progress=None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding picks exactly the continuation) for
    each (context ids, continuation ids). Over-long rows keep their last ``max_length + 1`` tokens, as the
    harness does. Right-padded batches, longest first; causality keeps the padding out of the scores."""
    device = next(model.parameters()).device
    max_length = max_length or model.cfg.max_seq_len
    rows = []
    for ctx, cont in pairs:
        if not cont:
            raise DataError("a continuation encodes to no tokens; every choice needs some text")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        rows.append((whole[:-1], list(cont)[-(len(whole) - 1):]))
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(rows[i][0]) for i in idx)
        x = torch.zeros(len(idx), width, dtype=torch.long)
        for b, i in enumerate(idx):
            x[b, :len(rows[i][0])] = torch.tensor(rows[i][0], dtype=torch.long)
        # the positions that predict a continuation token: (row in batch, position, target), flat
        row_of, pos, target = [], [], []
        for b, i in enumerate(idx):
            inp, cont = rows[i]
            row_of += [b] * len(cont)
            pos += range(len(inp) - len(cont), len(inp))
            target += cont
        sums, greedy = _continuation_logprobs(model, x.to(device), torch.tensor(row_of, device=device),
                                              torch.tensor(pos, device=device), torch.tensor(target, device=device))
        sums, greedy = sums.tolist(), greedy.tolist()  # the one read-back of the batch: (B,) and (B,)
        for b, i in enumerate(idx):
            out[i] = (sums[b], bool(greedy[b]))
        if progress is not None:
            progress.update(len(idx))
    return out


def _continuation_logprobs(model, x: torch.Tensor, row_of: torch.Tensor, pos: torch.Tensor,
                           target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device: (Σ log p(target) per row (B,) fp64, whether every target of the row is the argmax
    (B,) bool) over the N = len(target) positions ``(row_of, pos)`` of ``x`` (B, T). Only those N positions
    go through the LM head (a lmforge Transformer: inside its forward, where FSDP2 holds the head's weight);
    the (B, T, V) log-probabilities are never built, nor copied to the host."""
    logits = logits_at(model, x, lambda logits_of: logits_of((row_of, pos)).float())  # (N, V)
    logp = F.log_softmax(logits, dim=-1)  # (N, V)
    tgt = logp.gather(-1, target[:, None]).squeeze(-1).double()  # (N,)
    hit = (logp.argmax(-1) == target).to(torch.int32)  # (N,)
    B = x.size(0)
    sums = torch.zeros(B, dtype=torch.float64, device=x.device).index_add_(0, row_of, tgt)
    misses = torch.zeros(B, dtype=torch.int32, device=x.device).index_add_(0, row_of, 1 - hit)
    return sums, misses == 0


def _stderr(values: list[float]) -> float | None:
    """lm-eval's ``mean_stderr``: the sample standard deviation (n-1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def evaluate_choice(model, tokenizer, examples: Sequence[ChoiceExample], batch_size: int, add_bos: bool,
                    progress=None) -> tuple[dict, list[dict]]:
    """(metrics, per-example predictions) over ``examples``."""
    pairs, owner = [], []
    for n, ex in enumerate(examples):
        for choice in ex.choices:
            pairs.append(encode_pair(tokenizer, ex.query, " " + choice, add_bos))
            owner.append(n)
    if progress is not None:
        progress.total = len(pairs)
    scores = score_continuations(model, pairs, batch_size, progress=progress)
    lls: list[list[float]] = [[] for _ in examples]
    for n, (ll, _) in zip(owner, scores):
        lls[n].append(ll)
    acc, acc_norm, acc_bytes, predictions = [], [], [], []
    per_subject: dict[str, list[float]] = {}
    for ex, ll in zip(examples, lls):
        pred = max(range(len(ll)), key=lambda k: ll[k])  # first maximum, as numpy.argmax
        by_char = [v / len(c) for v, c in zip(ll, ex.choices)]
        by_byte = [v / len(c.encode("utf-8")) for v, c in zip(ll, ex.choices)]
        pred_norm = max(range(len(ll)), key=lambda k: by_char[k])
        pred_byte = max(range(len(ll)), key=lambda k: by_byte[k])
        acc.append(float(pred == ex.gold))
        acc_norm.append(float(pred_norm == ex.gold))
        acc_bytes.append(float(pred_byte == ex.gold))
        if ex.subject:
            per_subject.setdefault(ex.subject, []).append(acc[-1])
        predictions.append({"where": ex.where, "layout": ex.layout, "gold": ex.gold, "pred": pred,
                            "pred_norm": pred_norm, "loglikelihoods": ll})
    n = len(examples)
    metrics = {"n": n, "acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "acc_bytes": sum(acc_bytes) / n,
               "acc_stderr": _stderr(acc), "acc_norm_stderr": _stderr(acc_norm),
               "layouts": sorted({ex.layout for ex in examples})}
    if per_subject:
        metrics["per_subject"] = {s: {"n": len(v), "acc": sum(v) / len(v)} for s, v in sorted(per_subject.items())}
    return metrics, predictions
