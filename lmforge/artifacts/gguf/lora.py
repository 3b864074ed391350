"""A LoRA adapter dir (RUN/adapter) → a GGUF LoRA file for llama.cpp (``llama-cli -m BASE.gguf --lora FILE``,
``llama-server --lora FILE``), laid out as llama.cpp's ``convert_lora_to_gguf.py`` writes one:

    general.architecture = the base's graph (llama / qwen2 / qwen3), general.type = "adapter",
    adapter.type = "lora", adapter.lora.alpha = alpha (llama.cpp scales by alpha / rank)
    blk.{i}.attn_q.weight.lora_a   A (rank × in)       blk.{i}.attn_q.weight.lora_b   B (out × rank)

Under the ``llama`` graph the rows of the base's ``wq`` / ``wk`` are permuted for its RoPE order
(``tensors.halves_to_pairs``); W + s·B·A keeps that order only if B's rows are permuted the same way, so they
are (A is not). The base itself goes through ``export --format gguf`` (`lmforge.artifacts.gguf.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.artifacts.adapter_dir import read_adapter_meta, read_adapter_tensors
from lmforge.artifacts.gguf.export import GGUF_DTYPES, _tensor_order, gguf_architecture
from lmforge.artifacts.gguf.tensors import encode, gguf_name, halves_to_pairs
from lmforge.artifacts.metadata import read_metadata
from lmforge.atomic import atomic_directory
from lmforge.config import UserError


def export_gguf_lora(adapter_dir, out, dtype: str = "f16", name: str | None = None) -> dict[str, Any]:
    """Write ``out/adapter-<dtype>.gguf`` from an lmforge adapter dir (either layout). Returns a summary."""
    from gguf import GGUFType, GGUFWriter, Keys

    adapter_dir, out = Path(adapter_dir), Path(out)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype} is not a GGUF type; use one of {', '.join(GGUF_DTYPES)}")
    meta = read_adapter_meta(adapter_dir)
    if meta.get("task", "lm") != "lm":
        raise UserError(f"'{adapter_dir}' is a {meta['task']} adapter (it has a trained head); GGUF LoRA files "
                        "carry language-model adapters only: export the merged RUN/model instead")
    base = meta["base_model"]
    if not Path(base).is_dir():
        raise UserError(f"the base model '{base}' named in '{adapter_dir}' is gone; its GGUF graph cannot be "
                        "checked")
    cfg = read_metadata(base).model_config()
    arch = gguf_architecture(cfg)  # the base's graph; the same refusals as exporting the base
    sd = read_adapter_tensors(adapter_dir, meta)
    file_name = f"adapter-{dtype}.gguf"
    counts: dict[str, int] = {}
    names: dict[str, tuple[int, ...]] = {}
    with atomic_directory(out) as tmp:
        w = GGUFWriter(str(tmp / file_name), arch)
        w.add_type(GGUFType.ADAPTER)
        w.add_name(name or adapter_dir.resolve().name)
        w.add_string(Keys.Adapter.TYPE, "lora")
        w.add_float32(Keys.Adapter.LORA_ALPHA, float(meta["alpha"]))
        for key in sorted(sd, key=_tensor_order):
            module, _, part = key.rpartition(".")
            if part not in ("lora_A", "lora_B"):
                raise UserError(f"adapter tensor '{key}' is not a LoRA matrix; GGUF LoRA files hold lora_A/lora_B")
            t = sd[key]
            if arch == "llama" and part == "lora_B" and module.endswith((".attention.wq", ".attention.wk")):
                t = halves_to_pairs(t, cfg.n_heads if module.endswith(".wq") else cfg.n_kv_heads)
            data, raw = encode(t, dtype)
            kind = raw.name.lower() if raw is not None else ("f16" if data.dtype.itemsize == 2 else "f32")
            counts[kind] = counts.get(kind, 0) + 1
            gname = f"{gguf_name(module + '.weight')}.lora_{part[-1].lower()}"
            names[gname] = tuple(t.shape)
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = (tmp / file_name).stat().st_size
    return {"format": "gguf-lora", "architecture": arch, "out": str(out), "file": str(out / file_name),
            "dtype": dtype, "rank": meta["rank"], "alpha": meta["alpha"], "tensors": len(names),
            "params": sum(v.numel() for v in sd.values()), "bytes": size, "tensor_types": counts,
            "files": [file_name]}


__all__ = ["export_gguf_lora"]
