"""`lmforge import --hf DIR --out DIR`: a Hugging Face checkpoint → an lmforge model dir."""

from __future__ import annotations

from lmforge.console import emit, info

HELP = "convert a Hugging Face model dir (Llama, Mistral, Qwen2, GPT-2, BERT) into an lmforge model dir"


def add_arguments(p) -> None:
    p.add_argument("--hf", required=True, metavar="DIR", help="local Hugging Face model dir (config.json + weights)")
    p.add_argument("--out", required=True, metavar="DIR", help="lmforge model dir to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep the checkpoint's dtype, bit for bit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from lmforge.artifacts.hf.convert import import_hf
    from lmforge.outputs import exclusive_output, guard_output_dir

    guard_output_dir(args.out, inputs=[args.hf], overwrite=args.overwrite)
    with exclusive_output(args.out, "lmforge import", overwrite=args.overwrite):  # one writer of --out
        info(f"importing {args.hf} …")
        s = import_hf(args.hf, args.out, dtype=args.dtype, tokenizer_hash=_tokenizer_hash)
    heads = f", heads {'+'.join(s['heads'])}" if s["heads"] else ""
    tok = "tokenizer" if "tokenizer.json" in s["tokenizer"]["files"] else "no tokenizer"
    emit(args, f"imported {s['architecture'] or s['family']} ({s['params']:,} params, {s['dtype']}{heads}, {tok}) "
               f"-> {s['out']}", s)
    return 0


def _tokenizer_hash(directory) -> str | None:
    """The imported tokenizer's identity (recorded in config.json, checked whenever the dir is loaded)."""
    from lmforge.tokenizer.identity import tokenizer_dir_hash

    return tokenizer_dir_hash(directory)
