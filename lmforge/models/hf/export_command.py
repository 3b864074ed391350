"""`lmforge export --model DIR --format hf --out DIR`: an lmforge model dir → a Hugging Face model dir."""

from __future__ import annotations

import re

from lmforge.config import UserError
from lmforge.console import emit, info

HELP = "export an lmforge model dir as a Hugging Face model dir (transformers loads it offline)"


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '123' → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"--max-shard-size '{text}' is not a size; write e.g. 5GB or 500MB")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="lmforge model dir (RUN/model, an import, …)")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format (Hugging Face transformers)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--family", choices=["llama", "mistral", "qwen2", "gpt2", "bert"], default=None,
                   help="HF architecture family (default: the imported one, else chosen from the model's shape)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep their dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from lmforge.models.hf.convert import export_hf
    from lmforge.outputs import guard_output_dir

    guard_output_dir(args.out, inputs=[args.model], overwrite=args.overwrite)
    from lmforge.tokenizer.identity import check_model_dir_tokenizer

    check_model_dir_tokenizer(args.model)
    info(f"exporting {args.model} …")
    s = export_hf(args.model, args.out, family=args.family, dtype=args.dtype,
                  max_shard_bytes=parse_size(args.max_shard_size))
    n_shards = sum(f.endswith(".safetensors") for f in s["files"])
    tok = "tokenizer" if "tokenizer.json" in s["tokenizer"]["files"] else "no tokenizer"
    emit(args, f"exported {s['architecture']} ({s['params']:,} params, {s['dtype']}, {n_shards} safetensors "
               f"file{'s' if n_shards > 1 else ''}, {tok}) -> {s['out']}", s)
    return 0
