"""`lmforge export --model DIR --format hf|gguf|peft --out DIR`: an lmforge model dir → a Hugging Face model
dir, or a GGUF file for llama.cpp / Ollama (``lmforge.artifacts.gguf``); an adapter dir → a PEFT LoRA adapter
for the Hugging Face export of its base (``--format peft``)."""

from __future__ import annotations

import re

from lmforge.config import UserError
from lmforge.console import emit, info

HELP = ("export an lmforge model dir as a Hugging Face model dir (transformers loads it offline) or as GGUF "
        "(llama.cpp, Ollama)")


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
    p.add_argument("--model", required=True, metavar="DIR",
                   help="lmforge model dir (RUN/model, an import, …); an adapter dir (RUN/adapter) for --format "
                        "peft, or for --format gguf to write a GGUF LoRA file")
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "peft"],
                   help="hf: Hugging Face transformers dir; gguf: DIR/model-DTYPE.gguf + an Ollama Modelfile; "
                        "peft: a LoRA adapter dir peft.PeftModel.from_pretrained loads on the exported base")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--family", choices=["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "bert"], default=None,
                   help="HF architecture family (default: the imported one, else chosen from the model's shape)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "f32", "f16", "q8_0"], default=None,
                   help="hf: float32|bfloat16|float16 (default: keep the weights' dtype); "
                        "gguf: f32|f16|q8_0 (default f16)")
    p.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")


_GGUF_DTYPE = {"float32": "f32", "float16": "f16", "f32": "f32", "f16": "f16", "q8_0": "q8_0"}


def run(args) -> int:
    from lmforge.outputs import guard_output_dir

    if args.format == "hf" and args.dtype in ("f32", "f16", "q8_0"):
        raise UserError(f"--dtype {args.dtype} is a GGUF type; with --format hf use float32, bfloat16 or float16")
    if args.format == "gguf" and args.dtype is not None and args.dtype not in _GGUF_DTYPE:
        raise UserError(f"--dtype {args.dtype} is not a GGUF type; with --format gguf use f32, f16 or q8_0")
    if args.format == "peft" and args.dtype is not None:
        raise UserError("--dtype does not apply to --format peft; the adapter keeps its tensors' dtype")
    if args.format == "gguf" and args.family is not None:
        raise UserError("--family applies to --format hf; GGUF picks llama, qwen2 or qwen3 from the model's shape")
    guard_output_dir(args.out, inputs=[args.model], overwrite=args.overwrite)
    from lmforge.lock import check_not_being_written
    from lmforge.outputs import exclusive_output

    # A run that writes RUN/ replaces RUN/model when it ends: reading it meanwhile is refused, naming the run.
    check_not_being_written(args.model, "--model")
    with exclusive_output(args.out, "lmforge export", overwrite=args.overwrite):  # one writer of --out
        return _export(args)


def _export(args) -> int:
    from lmforge.artifacts.hf.convert import export_hf
    from lmforge.artifacts.identity import check_model_dir_tokenizer
    from lmforge.artifacts.metadata import is_adapter_dir, is_model_dir

    if args.format == "peft":
        return _run_peft(args)
    if args.format == "gguf" and is_adapter_dir(args.model) and not is_model_dir(args.model):
        return _run_gguf_lora(args)
    check_model_dir_tokenizer(args.model)
    if args.format == "gguf":
        return _run_gguf(args)
    info(f"exporting {args.model} …")
    s = export_hf(args.model, args.out, family=args.family, dtype=args.dtype,
                  max_shard_bytes=parse_size(args.max_shard_size))
    n_shards = sum(f.endswith(".safetensors") for f in s["files"])
    tok = "tokenizer" if "tokenizer.json" in s["tokenizer"]["files"] else "no tokenizer"
    emit(args, f"exported {s['architecture']} ({s['params']:,} params, {s['dtype']}, {n_shards} safetensors "
               f"file{'s' if n_shards > 1 else ''}, {tok}) -> {s['out']}", s)
    return 0


def _run_peft(args) -> int:
    from lmforge.artifacts.adapter_dir import export_peft

    info(f"exporting {args.model} as a PEFT adapter …")
    s = export_peft(args.model, args.out, family=args.family)
    emit(args, f"exported PEFT LoRA adapter for {s['family']} (rank {s['rank']}, alpha {s['alpha']:g}, "
               f"{s['tensors']} tensors, {s['params']:,} params) -> {s['out']}", s)
    return 0


def _run_gguf_lora(args) -> int:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("--format gguf needs the gguf package; pip install 'lmforge[gguf]'") from None
    from lmforge.artifacts.gguf.lora import export_gguf_lora

    dtype = _GGUF_DTYPE[args.dtype or "f16"]
    info(f"exporting adapter {args.model} as a GGUF LoRA file ({dtype}) …")
    s = export_gguf_lora(args.model, args.out, dtype)
    types = ", ".join(f"{n} {k}" for k, n in sorted(s["tensor_types"].items()))
    emit(args, f"exported GGUF LoRA adapter for {s['architecture']} (rank {s['rank']}, alpha {s['alpha']:g}, "
               f"{types} tensors, {s['bytes'] / 1e6:.2f} MB) -> {s['file']}", s)
    return 0


def _run_gguf(args) -> int:
    from pathlib import Path

    from lmforge.artifacts.gguf.export import export_gguf
    from lmforge.tokenizer.chat_template import uses_bos
    from lmforge.tokenizer.core import load_tokenizer
    from lmforge.tokenizer.llama_cpp import PRE_TOKENIZERS, ollama_template

    if not Path(args.model).is_dir():
        raise UserError(f"model dir '{args.model}' does not exist; pass RUN/model or a dir from `lmforge import`")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("--format gguf needs the gguf package; pip install 'lmforge[gguf]'") from None
    has_tok = any((Path(args.model) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = load_tokenizer(args.model) if has_tok else None
    dtype = _GGUF_DTYPE[args.dtype or "f16"]
    info(f"exporting {args.model} as GGUF ({dtype}) …")
    s = export_gguf(args.model, args.out, dtype, tokenizer, add_bos=bool(tokenizer and uses_bos(tokenizer)),
                    extra_pre=PRE_TOKENIZERS, ollama_template=ollama_template(tokenizer and tokenizer.chat_template))
    for w in s["warnings"]:
        info(f"warning: {w}")
    types = ", ".join(f"{n} {k}" for k, n in sorted(s["tensor_types"].items()))
    emit(args, f"exported GGUF {s['architecture']} ({s['params']:,} params, {types} tensors, "
               f"{s['bytes'] / 1e6:.1f} MB, tokenizer {s['tokenizer']['pre']}) -> {s['file']}", s)
    return 0
