"""An exported GGUF file in llama.cpp itself vs lmforge: same tokens, same logits, same greedy text.

    python bench/gguf_llama_cpp.py --model RUN/model --gguf OUT/model-q8_0.gguf [--text "..."] [--new-tokens 16]

Needs llama-cpp-python (``pip install llama-cpp-python``, which compiles llama.cpp: long on a small CPU), or
its pure-Python package with a separately built ``libllama.so`` (``LLAMA_CPP_LIB_PATH=DIR``). Not run by the
test suite (CI cannot build llama.cpp in its time); `tests/parity/test_gguf_export.py` holds the file against
`transformers`' GGUF loader instead. Prints one line per check (``--json`` for one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks? 你好，世界。 The quick brown fox, 12345."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the lmforge model dir the GGUF was exported from")
    ap.add_argument("--gguf", required=True, help="the .gguf file")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch
    from llama_cpp import Llama

    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.generate.engine import generate
    from lmforge.tokenizer.core import load_tokenizer

    ours, tok = load_model_dir(args.model).eval(), load_tokenizer(args.model)
    ids = tok.encode(args.text)
    if len(ids) + args.new_tokens > ours.cfg.max_seq_len:
        sys.exit(f"error: --text is {len(ids)} tokens; with --new-tokens it must fit {ours.cfg.max_seq_len}")
    with torch.no_grad():
        ref = ours(torch.tensor([ids]))[0].float().numpy()
    llm = Llama(model_path=args.gguf, n_ctx=ours.cfg.max_seq_len, logits_all=True, verbose=False, n_threads=1)
    theirs_ids = llm.tokenize(args.text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[:len(ids)])
    diff = np.abs(scores - ref)
    prompt = ids[: max(1, len(ids) // 2)]
    mine = generate(ours, [prompt], max_new_tokens=args.new_tokens)[0]
    theirs = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        theirs.append(int(t))
        if len(theirs) == args.new_tokens:
            break
    out = {"tokens": len(ids), "tokens_equal": theirs_ids == ids, "max_abs_logit_diff": float(diff.max()),
           "mean_abs_logit_diff": float(diff.mean()), "top1_agreement": float((scores.argmax(-1) == ref.argmax(-1)).mean()),
           "greedy_equal": mine == theirs, "greedy_tokens": args.new_tokens}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.gguf}: {out['tokens']} tokens, tokenization equal: {out['tokens_equal']}; logits max |Δ| "
              f"{out['max_abs_logit_diff']:.3g}, mean |Δ| {out['mean_abs_logit_diff']:.3g}, same top-1 "
              f"{out['top1_agreement']:.1%}; greedy {args.new_tokens} tokens equal: {out['greedy_equal']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
