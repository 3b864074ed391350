"""`lmforge eval --model DIR --task ppl|classify|qa|summarize|translate|choice|pairwise|safety --data PATH`.

Prints a short table of the metrics (stderr) and one summary line — or, with ``--json``, one JSON object —
on stdout, and writes the full results (settings, metrics, every prediction) as JSON to ``--out``
(default ``MODEL/eval/TASK-DATA.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.console import emit, info

HELP = ("evaluate a model dir: perplexity, classification, QA, summarization, translation, multiple choice, "
        "reward-model pairwise accuracy or safety (refusal / over-refusal)")
TASKS = ("ppl", "classify", "qa", "summarize", "translate", "choice", "pairwise", "safety")
DEFAULT_NEW_TOKENS = {"qa": 32, "summarize": 96, "translate": 96}
HEADLINE = {"ppl": ("perplexity", "bits_per_byte"), "classify": ("accuracy", "macro_f1"),
            "qa": ("exact_match", "f1"), "summarize": ("rouge1", "rouge2", "rougeL"),
            "translate": ("bleu", "chrf"), "choice": ("acc", "acc_norm"), "pairwise": ("accuracy", "margin"),
            "safety": ("refusal_rate", "over_refusal_rate")}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model dir (RUN/model, imported, fine-tuned or a classifier)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", default=None, help="data file: txt/jsonl (ppl), tsv/csv/jsonl (classify), "
                   "SQuAD json / jsonl (qa), jsonl / tsv / csv (summarize), tsv / jsonl pairs (translate), "
                   "MMLU / C-Eval / CMMLU / HellaSwag jsonl or csv (choice), "
                   "preference pairs (pairwise), jsonl requests (safety; default: the shipped bilingual set)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="results JSON (default MODEL/eval/TASK-DATA.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file lmforge did not write")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only N examples (documents for ppl)")
    p.add_argument("--subset", choices=("first", "spread"), default="first",
                   help="with --max-examples: the first N, or N spread evenly over the file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    g.add_argument("--text-field", default=None, help="jsonl text field (ppl: text; classify: auto)")
    g.add_argument("--txt-mode", choices=("file", "blank", "line"), default="file",
                   help="ppl on text files: one document per file, per blank-line block or per line "
                        "(use what `lmforge prepare --txt-mode` used for training)")
    g = p.add_argument_group("classification")
    g.add_argument("--label-field", default="label", help="label column / field (a number for header-less TSV)")
    g.add_argument("--labels", default=None, help="comma-separated label set (default: the model's or the data's)")
    g.add_argument("--label-words", default=None,
                   help="zero-shot: comma-separated words the LM scores, one per label (default: the labels)")
    g = p.add_argument_group("generation (qa, summarize, translate)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="qa 32, summarize/translate 96")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--prompt", default=None, help="prompt template with {field} placeholders (qa: {question} "
                   "{context}; summarize: {source}; translate: {source} {src_name} {tgt_name}; "
                   "classify: {text})")
    g.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    g.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    g.add_argument("--src-lang", default=None, help="translate: source language code (default: guessed)")
    g.add_argument("--tgt-lang", default=None, help="translate: target language code (default: guessed)")
    g.add_argument("--reverse", action="store_true", help="translate TSV: target<TAB>source instead")
    g.add_argument("--source-field", default=None,
                   help="summarize: source field / column (default: source, document, article, text, …)")
    g.add_argument("--target-field", default=None,
                   help="summarize: summary field / column (default: target, summary, tldr, …; a column number "
                        "for a TSV/CSV without a header)")
    g = p.add_argument_group("multiple choice")
    g.add_argument("--layout", default="auto", choices=("auto", "mmlu", "ceval", "cmmlu", "hellaswag"),
                   help="choice: the data layout and prompt (auto: HellaSwag if 'endings', CMMLU if 'Question', "
                        "C-Eval if the question is Chinese, else MMLU)")
    g = p.add_argument_group("safety")
    g.add_argument("--judge", default="phrases", help="what counts a reply as a refusal: 'phrases' (English and "
                   "Chinese refusal phrases) or a classifier model dir (finetune.mode=classify)")
    g.add_argument("--refusal-label", default="refusal", help="the classifier judge's label for a refusal")
    g.add_argument("--split", default=None, help="only the requests of this split (train | test) of the set")


def _check_args(args) -> None:
    from lmforge.config import UserError

    for flag, value in (("--batch-size", args.batch_size), ("--max-examples", args.max_examples),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value <= 0:
            raise UserError(f"{flag}={value} must be positive")
    if not Path(args.model).is_dir():
        raise UserError(f"model dir '{args.model}' does not exist; pass RUN/model or a dir from `lmforge import`")
    if args.data is None and args.task != "safety":
        raise UserError(f"--task {args.task} needs --data FILE")
    if args.data is not None and not Path(args.data).is_file():
        raise UserError(f"data file '{args.data}' does not exist")
    from lmforge.outputs import guard_output_file

    judge_dir = args.judge if args.task == "safety" and args.judge != "phrases" else None
    guard_output_file(_out_path(args), inputs=[args.model, args.data, judge_dir], overwrite=args.overwrite,
                      ours=_is_eval_result)
    from lmforge.artifacts.identity import check_model_dir_tokenizer

    check_model_dir_tokenizer(args.model)


def _out_path(args) -> Path:
    stem = Path(args.data).stem if args.data else "shipped"
    return Path(args.out) if args.out else Path(args.model) / "eval" / f"{args.task}-{stem}.json"


def _is_eval_result(path: Path) -> bool:
    """A results file an earlier `lmforge eval` wrote (it may be replaced without --overwrite)."""
    from lmforge.config import read_json_bounded

    try:
        data = read_json_bounded(path, what="results file")
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return isinstance(data, dict) and {"task", "model", "data", "metrics"} <= set(data)


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(args) -> int:
    import torch

    from lmforge.config import UserError, atomic_write_text
    from lmforge.eval.progress import Progress

    _check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result = {"task": args.task, "model": str(args.model), "data": str(args.data) if args.data else None,
              "seed": args.seed,
              "batch_size": args.batch_size, "device": str(device)}
    progress = Progress(0, f"eval {args.task}", enabled=True)
    try:
        runner = {"ppl": _ppl, "classify": _classify, "qa": _generation, "summarize": _generation,
                  "translate": _generation, "choice": _choice, "pairwise": _pairwise,
                  "safety": _safety}[args.task]
        result.update(runner(args, device, dtype, progress))
    finally:
        progress.close()
    result["seconds"] = round(time.perf_counter() - t0, 2)

    out = _out_path(args)
    try:
        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False))
    except OSError as e:
        raise UserError(f"cannot write results to '{out}' ({e.strerror}); pass --out FILE") from None

    metrics = result["metrics"]
    for line in format_table(args.task, metrics):
        info(line)
    head = " ".join(f"{k}={metrics[k]:.4g}" if metrics[k] is not None else f"{k}=n/a" for k in HEADLINE[args.task])
    n = metrics.get("n", metrics.get("documents"))
    if args.task == "safety":
        n = metrics["n_harmful"] + metrics["n_benign"]
    summary = f"eval {args.task}: {head} (n={n}, " \
              f"{result['seconds']:.1f}s) -> {out}"
    payload = {k: v for k, v in result.items() if k != "predictions"}
    payload["results_file"] = str(out)
    emit(args, summary, payload)
    return 0


def format_table(task: str, metrics: dict) -> list[str]:
    """A short human table: the headline metrics, then a confusion matrix for classification."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in rows]
    if task == "classify" and "confusion_matrix" in metrics:
        labels = metrics["labels"]
        w = max(6, *(len(lab) for lab in labels))
        lines.append("  confusion (rows = gold, columns = predicted):")
        lines.append("  " + " " * w + "".join(f"{lab:>{w + 1}}" for lab in labels))
        for lab, row in zip(labels, metrics["confusion_matrix"]):
            lines.append(f"  {lab:>{w}}" + "".join(f"{c:>{w + 1}}" for c in row))
    if task == "safety":  # per category and language: refusal on harmful / over-refusal on benign (%)
        for group in ("per_category", "per_language"):
            for name, m in metrics.get(group, {}).items():
                r, o = m["refusal_rate"], m["over_refusal_rate"]
                lines.append(f"  {name:<16} refusal {'n/a' if r is None else f'{r:5.1f}%'}  "
                             f"over-refusal {'n/a' if o is None else f'{o:5.1f}%'}")
    return lines


# ---- tasks ------------------------------------------------------------------------------------------
def _load_lm(args, device, dtype):
    from lmforge.config import UserError
    from lmforge.eval.loading import load_for_eval

    model, tokenizer, labels = load_for_eval(args.model, device, dtype)
    if labels is not None:
        raise UserError(f"'{args.model}' is a classifier (labels {labels}); use it with --task classify")
    return model, tokenizer


def _ppl(args, device, dtype, progress) -> dict:
    from lmforge.eval.datasets import read_texts, subset
    from lmforge.eval.perplexity import perplexity

    texts = subset(read_texts(args.data, args.text_field or "text", args.txt_mode), args.max_examples, args.subset)
    model, tokenizer = _load_lm(args, device, dtype)
    metrics = perplexity(model, tokenizer, texts, args.seq_len, args.batch_size, progress)
    return {"metrics": metrics}


def _classify(args, device, dtype, progress) -> dict:
    from lmforge.config import UserError
    from lmforge.data.labelled import encode_labelled, label_list, load_labelled
    from lmforge.eval.classification import classification_scores
    from lmforge.eval.datasets import subset
    from lmforge.eval.tasks import classify_with_head, zero_shot_classify

    examples = subset(load_labelled(args.data, args.text_field, args.label_field), args.max_examples, args.subset)
    from lmforge.eval.loading import load_for_eval

    model, tokenizer, head_labels = load_for_eval(args.model, device, dtype)
    if head_labels is not None:
        clf, labels = model, head_labels
        if args.labels and _split(args.labels) != labels:
            raise UserError(f"--labels {args.labels} differ from the classifier's labels {labels}; drop --labels")
        unknown = sorted({e.label for e in examples} - set(labels))
        if unknown:
            raise UserError(f"the data has labels {unknown} the classifier does not know (it has {labels}); "
                            "check --label-field")
        from lmforge.artifacts.metadata import read_metadata

        # cut texts where fine-tuning cut them (data.seq_len; older dirs: the context length)
        max_tokens = min(read_metadata(args.model).max_tokens or clf.cfg.max_seq_len, clf.cfg.max_seq_len)
        ids, golds = encode_labelled(tokenizer, examples, labels, max_tokens)
        progress.total = len(ids)
        preds = classify_with_head(clf, ids, args.batch_size, tokenizer.pad_id or 0, progress)
        mode = "head"
        words = None
    else:
        labels = _split(args.labels) or label_list(examples)
        unknown = sorted({e.label for e in examples} - set(labels))
        if unknown:
            raise UserError(f"the data has labels {unknown} missing from --labels {labels}")
        words = _split(args.label_words) or labels
        if len(words) != len(labels):
            raise UserError(f"--label-words has {len(words)} words for {len(labels)} labels {labels}; "
                            "give one word per label, in the same order")
        index = {lab: i for i, lab in enumerate(labels)}
        golds = [index[e.label] for e in examples]
        progress.total = len(examples) * len(labels)
        preds = zero_shot_classify(model, tokenizer, [e.text for e in examples], words, args.batch_size,
                                   args.prompt or "{text}\nAnswer:", progress)
        mode = "zero-shot"
    metrics = classification_scores([labels[g] for g in golds], [labels[p] for p in preds], labels)
    predictions = [{"where": e.where, "gold": labels[g], "predicted": labels[p]}
                   for e, g, p in zip(examples, golds, preds)]
    return {"mode": mode, "label_words": words, "metrics": metrics, "predictions": predictions}


def _generation(args, device, dtype, progress) -> dict:
    from lmforge.config import UserError
    from lmforge.eval import datasets as D
    from lmforge.eval.tasks import PromptBuilder, generate_answers, postprocess

    task = args.task
    extra: dict[str, str] = {}
    settings: dict = {}
    if task == "qa":
        examples = D.load_qa(args.data)
    elif task == "summarize":
        examples = D.load_summarization(args.data, args.source_field, args.target_field)
    else:
        examples, src, tgt = D.load_translation(args.data, args.src_lang, args.tgt_lang, args.reverse)
        extra = {"src_lang": src, "tgt_lang": tgt, "src_name": D.lang_name(src), "tgt_name": D.lang_name(tgt)}
        settings.update(src_lang=src, tgt_lang=tgt)
    examples = D.subset(examples, args.max_examples, args.subset)
    model, tokenizer = _load_lm(args, device, dtype)
    if not model.cfg.causal or not model.cfg.lm_head:
        raise UserError(f"task {task} generates text and needs a causal LM; '{args.model}' is an encoder")
    new_tokens = args.max_new_tokens or DEFAULT_NEW_TOKENS[task]
    max_prompt = model.cfg.max_seq_len - new_tokens
    if max_prompt < 8:
        raise UserError(f"--max-new-tokens={new_tokens} leaves no room for a prompt in the model's "
                        f"max_seq_len={model.cfg.max_seq_len}; ask for fewer tokens")
    build = PromptBuilder(tokenizer, task, max_prompt, chat=not args.no_chat, template=args.chat_template,
                          custom_prompt=args.prompt, extra_fields=extra)
    prompts, truncated = [], 0
    for ex in examples:
        ids, cut = build(ex)
        prompts.append(ids)
        truncated += cut
    progress.total = len(prompts)
    raw = generate_answers(model, tokenizer, prompts, new_tokens, args.batch_size, args.seed,
                           args.temperature, args.top_k, args.top_p, progress)
    preds = [postprocess(task, r) for r in raw]
    refs = [ex.references for ex in examples]
    if task == "qa":
        from lmforge.eval.qa import qa_scores

        metrics = qa_scores(preds, refs)
    elif task == "summarize":
        from lmforge.eval.rouge import rouge_scores

        metrics = rouge_scores(preds, refs)
    else:
        from lmforge.eval.translation import translation_scores

        metrics = translation_scores(preds, refs, "zh" if settings["tgt_lang"].startswith("zh") else None)
    metrics["truncated_prompts"] = truncated
    metrics["empty_predictions"] = sum(1 for p in preds if not p)
    settings.update(max_new_tokens=new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, chat=not args.no_chat)
    predictions = [{"id": ex.id, "prediction": p, "references": ex.references, "raw": r}
                   for ex, p, r in zip(examples, preds, raw)]
    return {"settings": settings, "metrics": metrics, "predictions": predictions}


def _choice(args, device, dtype, progress) -> dict:
    from lmforge.eval.choice import evaluate_choice, load_choice
    from lmforge.eval.datasets import subset
    from lmforge.tokenizer.chat_template import uses_bos

    examples = subset(load_choice(args.data, args.layout), args.max_examples, args.subset)
    model, tokenizer = _load_lm(args, device, dtype)
    if not model.cfg.causal or not model.cfg.lm_head:
        from lmforge.config import UserError

        raise UserError(f"task choice scores continuations and needs a causal LM; '{args.model}' is an encoder")
    add_bos = uses_bos(tokenizer)
    metrics, predictions = evaluate_choice(model, tokenizer, examples, args.batch_size, add_bos, progress)
    return {"settings": {"layout": args.layout, "add_bos": add_bos}, "metrics": metrics, "predictions": predictions}


# ---- alignment tasks (lmforge/eval/pairwise.py, lmforge/eval/safety.py) ---------------------------------
def _pairwise(args, device, dtype, progress) -> dict:
    from lmforge.eval.pairwise import evaluate_pairwise

    return evaluate_pairwise(args.model, args.data, device, dtype, args.batch_size, args.max_examples,
                             args.chat_template, progress)


def _safety(args, device, dtype, progress) -> dict:
    from lmforge.eval.datasets import subset
    from lmforge.eval.safety import load_safety_set, make_judge, run_safety

    examples = subset(load_safety_set(args.data, args.split), args.max_examples, args.subset)
    judge = make_judge(args.judge, args.refusal_label, device)  # checked before the (slow) generation
    model, tokenizer = _load_lm(args, device, dtype)
    if not model.cfg.causal or not model.cfg.lm_head:
        from lmforge.config import UserError

        raise UserError(f"task safety generates replies and needs a causal LM; '{args.model}' is not one")
    new_tokens = args.max_new_tokens or 64
    metrics, predictions = run_safety(model, tokenizer, examples, judge, new_tokens, args.batch_size, args.seed,
                                      not args.no_chat, args.chat_template, args.temperature, args.top_k,
                                      args.top_p, progress)
    settings = {"judge": getattr(judge, "name", "phrases"), "max_new_tokens": new_tokens, "split": args.split,
                "data": args.data or "shipped bilingual set", "temperature": args.temperature}
    return {"settings": settings, "metrics": metrics, "predictions": predictions}
