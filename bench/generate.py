"""Decode speed: lmforge's KV-cache generation vs `transformers` `generate`, same weights, one run.

    python bench/generate.py                       # the `small` preset, random weights, CPU
    python bench/generate.py --preset tiny --batch 4 --new-tokens 128 --threads 1
    python bench/generate.py --hf path/to/hf_model  # a local Hugging Face checkpoint (imported first)

Both sides decode greedily from the same prompt ids with no EOS stop, so they produce the same number of
tokens (and, being the same model, the same tokens: checked and printed). Prints one line with both
speeds and the ratio lmforge / transformers (``--json`` for one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _models(args, tmp: Path):
    import torch
    import transformers

    transformers.logging.disable_progress_bar()
    from lmforge.artifacts.hf.convert import export_hf, import_hf
    from lmforge.artifacts.model_dir import load_model_dir, save_model_dir
    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.hf:
        import_hf(args.hf, tmp / "lm")
        hf_dir = Path(args.hf)
    else:
        model = build_model(get_preset(args.preset), seed=0)
        save_model_dir(model, tmp / "lm")
        export_hf(tmp / "lm", tmp / "hf")
        hf_dir = tmp / "hf"
    ours = load_model_dir(tmp / "lm", device=args.device, dtype=dtype).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(args.device).eval()
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    return ours, theirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="lmforge preset for random weights (default small)")
    p.add_argument("--hf", default=None, help="a local HF checkpoint instead of a preset")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from lmforge.generate.engine import GenerationConfig, generate_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as t:
        ours, theirs = _models(args, Path(t))
        vocab = ours.cfg.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g)
        gen = GenerationConfig(max_new_tokens=args.new_tokens)

        def run_ours(n):
            return generate_ids(ours, prompts.tolist(), GenerationConfig(max_new_tokens=n))

        def run_theirs(n):
            x = prompts.to(args.device)
            with torch.no_grad():
                out = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True)
            return out[:, args.prompt_len:].tolist()

        def timed(fn):
            fn(4)  # warm-up: allocator, kernels, lazy init
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(gen.max_new_tokens)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out, time.perf_counter() - t0

        a, ta = timed(run_ours)
        b, tb = timed(run_theirs)
    n = args.batch * args.new_tokens
    res = {"model": args.hf or args.preset, "params": sum(p.numel() for p in ours.parameters()),
           "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "batch": args.batch,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "lmforge_tok_s": round(n / ta, 1), "transformers_tok_s": round(n / tb, 1),
           "ratio": round(tb / ta, 3), "same_tokens": a == b, "transformers": _version()}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"decode {res['model']} ({res['params']:,} params, {args.device} {args.dtype}, batch {args.batch}, "
              f"{args.prompt_len}+{args.new_tokens} tokens): lmforge {res['lmforge_tok_s']:,} tok/s, "
              f"transformers {res['transformers_tok_s']:,} tok/s, ratio {res['ratio']:.2f}x "
              f"(same tokens: {'yes' if res['same_tokens'] else 'NO'})")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _version() -> str:
    from importlib.metadata import version

    return version("transformers")


if __name__ == "__main__":
    raise SystemExit(main())
