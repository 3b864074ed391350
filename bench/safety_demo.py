"""Safety demonstration (issue 12): does DPO on refusal pairs make a small en+zh chat model refuse held-out
harmful requests more, without refusing their benign look-alikes?

Every model step runs through the `lmforge` CLI; this script only writes the data files, runs the steps in
order (a step whose output exists is skipped, so a rerun continues) and prints the before/after table:

  1. corpus      English wiki demo + Chinese classics + the Alpaca en/zh demo texts -> OUT/data/pretrain.txt
  2. tokenizer   byte-level BPE on that corpus (so it knows Chinese), `lmforge tokenizer train`
  3. pretrain    a small base on the corpus, `lmforge prepare` + `lmforge pretrain`
  4. SFT         Alpaca en+zh demo records (+ a few refusals from the safety set's *train* half), `finetune`
  5. preference  pairs from the *train* half: harmful -> chosen refusal / rejected compliance; benign look-alike ->
                 the reverse, `lmforge finetune` with `finetune.mode: dpo`, once per `--losses` entry (default DPO's
                 `sigmoid` and `orpo`), each from the SFT model
  6. eval        `lmforge eval --task safety --split test` on the SFT model (before) and each tuned model (after)

    python bench/safety_demo.py --out runs/safety-demo [--data ../shared/data] [--threads 1]

The held-out `test` half of the shipped set is never trained on (neither the tokenizer nor any stage sees it).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REFUSAL = {"en": "I'm sorry, but I can't help with that.", "zh": "抱歉，我不能提供这方面的帮助。"}
COMPLY = {"en": "Sure, here is how to do it, step by step.", "zh": "好的，下面是具体的做法。"}


def safety_set(split: str) -> list[dict]:
    from lmforge.eval.safety import shipped_set_path

    rows = [json.loads(line) for line in shipped_set_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from lmforge.config import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def alpaca_chats(path: Path) -> list[dict]:
    out = []
    for r in json.loads(path.read_text(encoding="utf-8")):
        user = r["instruction"] + (("\n" + r["input"]) if r.get("input") else "")
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
    return out


def build_data(data: Path, out: Path, sft_refusals: int, sft_repeat: int, help_pairs: int, seed: int) -> None:
    """pretrain.txt (one document per line), sft.jsonl (chat records), pairs.jsonl (the safety set's train half
    + `help_pairs` ordinary Alpaca requests) and general.jsonl (unseen ordinary requests, to measure
    over-refusal outside the set)."""
    from lmforge.config import atomic_write_text

    demo = data / "instruct_llamafactory_demo"
    chats = alpaca_chats(demo / "alpaca_en_demo.json") + alpaca_chats(demo / "alpaca_zh_demo.json")
    train = safety_set("train")

    docs = [line.strip() for line in (data / "english_corpus/llamafactory_pretrain_demo/wiki_demo.txt")
            .read_text(encoding="utf-8").splitlines() if line.strip()]
    for name in ("tangshi_300.json", "lunyu.json", "songci_300.json"):
        for item in json.loads((data / "chinese_poetry/classics" / name).read_text(encoding="utf-8")):
            text = "".join(item.get("paragraphs", [])) if isinstance(item, dict) else ""
            if text:
                docs.append(text)
    docs += [" ".join(m["content"].replace("\n", " ") for m in c["messages"]) for c in chats]
    random.Random(seed).shuffle(docs)
    atomic_write_text(out / "pretrain.txt", "\n".join(docs) + "\n")

    # SFT: the Alpaca replies, plus refusals for a few harmful train-half requests (spread over categories and
    # languages) so the refusal sentence is a reply the base can produce; DPO then decides when to use it.
    harmful = [r for r in train if r["type"] == "harmful"]
    k = min(sft_refusals, len(harmful))
    picked = [harmful[i * len(harmful) // k] for i in range(k)]  # evenly spaced: every category, both languages
    sft = chats + [{"messages": [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": REFUSAL[r["lang"]]}]} for r in picked] * sft_repeat
    random.Random(seed).shuffle(sft)
    write_jsonl(out / "sft.jsonl", sft)

    pairs = []
    for r in train:  # the safety pairs
        refuse, comply = REFUSAL[r["lang"]], COMPLY[r["lang"]]
        chosen, rejected = (refuse, comply) if r["type"] == "harmful" else (comply, refuse)
        pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
    # helpfulness pairs: ordinary Alpaca requests (from the SFT data) whose chosen reply is the Alpaca answer and
    # rejected one the refusal, so that tuning does not learn "refuse anything that is not a look-alike"
    for lang in ("en", "zh"):
        recs = [r for r in json.loads((demo / f"alpaca_{lang}_demo.json").read_text(encoding="utf-8"))
                if not r.get("input", "").strip()]
        for r in random.Random(seed).sample(recs, help_pairs // 2):
            pairs.append({"prompt": r["instruction"], "chosen": r["output"], "rejected": REFUSAL[lang]})
    write_jsonl(out / "pairs.jsonl", pairs)

    # ordinary requests never trained on (the bilingual Alpaca translation, part 1), as "benign" safety records
    seen = {m["content"] for c in chats for m in c["messages"]}
    general = []
    for r in json.loads((data / "instruct_alpaca_bilingual_zh_en/alpaca_chinese_part_1.json").read_text("utf-8")):
        lang = "en" if len(general) < 25 else "zh"
        if len(general) == 50 or r.get("en_input", "").strip() or r.get("zh_input", "").strip() \
                or r[f"{lang}_instruction"] in seen:
            continue
        general.append({"id": f"alpaca-{lang}-{len(general):02d}", "category": "ordinary", "type": "benign",
                        "lang": lang, "prompt": r[f"{lang}_instruction"]})
    write_jsonl(out / "general.jsonl", general)
    print(f"data: {len(docs)} pretraining documents, {len(sft)} SFT records ({len(picked)} refusals x {sft_repeat}), "
          f"{len(pairs)} preference pairs ({len(train)} from the safety train half), {len(general)} unseen ordinary "
          f"requests -> {out}", file=sys.stderr)


def lmforge(*args: str, done: Path | None = None) -> None:
    """Run one CLI step (skipped when `done` exists); stop the demo on failure."""
    if done is not None and done.exists():
        print(f"skip (done): lmforge {' '.join(args)}", file=sys.stderr)
        return
    cmd = [sys.executable, "-m", "lmforge", *args]
    print("$ lmforge " + " ".join(args), file=sys.stderr, flush=True)
    t = time.time()
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        fail(f"step failed (exit {rc}): lmforge {' '.join(args)}; fix what it printed and rerun (done steps are kept)")
    print(f"  ({time.time() - t:.0f}s)", file=sys.stderr, flush=True)


def safety(model: Path, new_tokens: int, general: Path) -> tuple[dict, dict]:
    """The shipped set's held-out test half, and over-refusal on unseen ordinary requests."""
    results = []
    for name, data in (("safety-test.json", ["--split", "test"]), ("safety-general.json", ["--data", str(general)])):
        out = model / "eval" / name
        lmforge("eval", "--model", str(model), "--task", "safety", *data, "--max-new-tokens", str(new_tokens),
                "--out", str(out), done=out)
        results.append(json.loads(out.read_text(encoding="utf-8"))["metrics"])
    return results[0], results[1]


def pct(x) -> str:
    return "-" if x is None else f"{x:.0f}%"


def by_lang(metrics: dict, key: str) -> str:
    return ", ".join(f"{lang} {pct(m.get(key))}" for lang, m in sorted(metrics.get("per_language", {}).items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/safety-demo")
    p.add_argument("--data", default="../shared/data", help="the shared data dir (Alpaca demo, wiki demo, poetry)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--sft-refusals", type=int, default=10, help="harmful train-half requests answered by a refusal in SFT")
    p.add_argument("--sft-repeat", type=int, default=1, help="how many times each SFT refusal appears")
    p.add_argument("--help-pairs", type=int, default=100, help="ordinary Alpaca requests added as pairs (answer > refusal)")
    p.add_argument("--losses", default="sigmoid,orpo", help="dpo.loss values to run, each from the SFT model")
    p.add_argument("--dpo-epochs", type=int, default=16)
    p.add_argument("--dpo-lr", type=float, default=1e-3)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out, data = Path(a.out), Path(a.data)
    if not (data / "instruct_llamafactory_demo/alpaca_zh_demo.json").is_file():
        fail(f"--data {data} has no instruct_llamafactory_demo/alpaca_zh_demo.json; point it at the shared data dir "
             "(../shared/data)")
    threads = f"train.threads={a.threads}"
    t0 = time.time()

    d = out / "data"
    if not (d / "pairs.jsonl").exists():
        build_data(data, d, a.sft_refusals, a.sft_repeat, a.help_pairs, a.seed)
    lmforge("tokenizer", "train", "--input", str(d / "pretrain.txt"), "--vocab-size", str(a.vocab_size),
            "--out", str(out / "tok"), "--txt-mode", "line", done=out / "tok" / "tokenizer.json")
    lmforge("prepare", "--input", str(d / "pretrain.txt"), "--tokenizer", str(out / "tok"), "--out",
            str(out / "shards"), "--txt-mode", "line", "--val-fraction", "0.02", done=out / "shards" / "index.json")
    # the quickstart's batch/lr/eval settings with the recipe this demo was measured with (AdamW, the preset's
    # SwiGLU MLP, cosine), pinned since the quickstart moved to Muon + squared ReLU + WSD (README "Recipe")
    lmforge("pretrain", "--config", "quickstart", f"run.dir={out / 'pre'}",
            f'model={{"preset": "{a.preset}"}}', "optim.name=adamw", "schedule.name=cosine",
            f"data.dir={out / 'shards'}", f"data.seq_len={a.seq_len}", f"train.max_steps={a.pretrain_steps}",
            "eval.interval=200", "checkpoint.interval=200", "log.interval=50", threads,
            done=out / "pre" / "model" / "config.json")
    lmforge("finetune", "--config", "finetune/sft", f"run.dir={out / 'sft'}",
            f"model.from={out / 'pre' / 'model'}", f"data.train={d / 'sft.jsonl'}", "data.format=auto",
            "data.columns={}", f"data.seq_len={a.seq_len}", f"train.epochs={a.sft_epochs}", "optim.lr=2e-3",
            "eval.interval=100", "checkpoint.interval=200", "log.interval=20", threads,
            done=out / "sft" / "model" / "config.json")
    general = d / "general.jsonl"
    results = [("SFT (before)", safety(out / "sft" / "model", a.new_tokens, general))]
    for loss in a.losses.split(","):
        run = out / f"pref-{loss}"
        lmforge("finetune", "--config", "finetune/dpo", f"run.dir={run}",
                f"model.from={out / 'sft' / 'model'}", f"data.train={d / 'pairs.jsonl'}", f"data.seq_len={a.seq_len}",
                f"train.epochs={a.dpo_epochs}", f"optim.lr={a.dpo_lr}", f"dpo.loss={loss}", f"dpo.beta={a.dpo_beta}",
                "eval.interval=10", "checkpoint.interval=100", threads, done=run / "model" / "config.json")
        results.append((f"after `dpo.loss: {loss}`", safety(run / "model", a.new_tokens, general)))

    m0 = results[0][1][0]
    print(f"\nheld-out test half of the shipped set ({m0['n_harmful']} harmful + {m0['n_benign']} benign), greedy, "
          f"{a.new_tokens} new tokens, phrase judge:")
    print("| model | refusal on harmful (test) | over-refusal on benign look-alikes (test) | empty replies | "
          "over-refusal on unseen ordinary requests |")
    print("|---|---:|---:|---:|---:|")
    for name, (m, g) in results:
        print(f"| {name} | {pct(m['refusal_rate'])} ({by_lang(m, 'refusal_rate')}) | "
              f"{pct(m['over_refusal_rate'])} ({by_lang(m, 'over_refusal_rate')}) | "
              f"{m['empty_replies']} of {m['n_harmful'] + m['n_benign']} | "
              f"{pct(g['over_refusal_rate'])} ({g['empty_replies']} empty of {g['n_benign']}) |")
    print(f"\n(total {time.time() - t0:.0f}s; replies in {out}/*/model/eval/safety-*.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
