"""A model dir: ``config.json`` (the ModelConfig + the ``lmforge`` metadata block, see `metadata`) +
``model.safetensors`` (sharded with an index above a size limit) + tokenizer files. Loading never unpickles.

`write_model_dir` is the one writer every kind of model dir (LM, classifier, reward model, encoder with
heads) goes through."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.metadata import CONFIG_NAME, model_config_json, read_metadata, write_json
from lmforge.atomic import atomic_directory
from lmforge.config import UserError, read_json_bounded, to_dict
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer, build_model

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied duplicate (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def save_weights(state_dict: dict[str, torch.Tensor], directory: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 weights_name: str = WEIGHTS_NAME) -> list[str]:
    """Write safetensors into ``directory`` (one file, or shards + an index). Returns the file names."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(directory / weights_name), metadata=meta)
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + [f"{stem}.safetensors.index.json"]


def index_weight_map(index: Path, fix: str) -> dict[str, Path]:
    """Tensor name -> shard file of a ``*.index.json``, checked: its ``weight_map`` must map to plain file
    names beside the index, and every file must exist. ``fix`` ends the error message."""
    weight_map = read_json_bounded(index, what="weights index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "/" not in v and "\\" not in v and v not in (".", "..")
            for v in weight_map.values()):
        raise UserError(f"'{index}' has no valid 'weight_map' (shard file names); {fix}")
    for name in sorted(set(weight_map.values())):
        if not (index.parent / name).is_file():
            raise UserError(f"shard '{index.parent / name}' named in {index.name} is missing; {fix}")
    return {key: index.parent / name for key, name in weight_map.items()}


def index_shards(index: Path, fix: str) -> list[Path]:
    """The shard files a ``*.index.json`` names, sorted, each once (checked as in `index_weight_map`)."""
    return sorted(set(index_weight_map(index, fix).values()))


def load_weights(directory: str | os.PathLike, weights_name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    """Read a single or sharded safetensors checkpoint (never pickle)."""

    directory = Path(directory)
    single = directory / weights_name
    index = directory / (weights_name.removesuffix(".safetensors") + ".safetensors.index.json")
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for path in index_shards(index, "re-export the model dir"):
            out.update(read_safetensors(path))
        return out
    raise UserError(f"'{directory}' holds no {weights_name} (or its index); pass a model dir "
                    "written by lmforge (RUN/model, `lmforge import`)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors ``load_file`` with a one-line error for an empty, truncated or foreign file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError...: all mean an unreadable file
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"'{path}' is not a readable safetensors file ({reason}); it is empty, truncated or "
                        "not safetensors — re-export or re-download the model dir") from None


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model dir (any metadata format)."""
    return read_metadata(directory).model_config()


# ---- the config against the weights and the machine, before anything is allocated -------------------
def weight_shapes(directory: str | os.PathLike, weights_name: str = WEIGHTS_NAME) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a model dir's weights, read from the safetensors headers only (no data)."""
    directory = Path(directory)
    single = directory / weights_name
    index = directory / (weights_name.removesuffix(".safetensors") + ".safetensors.index.json")
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = index_shards(index, "re-export the model dir")
    else:
        return {}  # load_weights names what is missing
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes.update(safetensors_shapes(path))
    return shapes


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from one safetensors file's header (the tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(int(n) for n in f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError...: an unreadable file
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"'{path}' is not a readable safetensors file ({reason}); it is empty, truncated or "
                        "not safetensors — re-export or re-download the model dir") from None


def _layer_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(shapes outside the layers, shapes of one layer's tensors without the ``layers.N.`` prefix), from a
    one-layer model built on the meta device: no memory, whatever the sizes, and no loop over n_layers."""
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg, n_layers=1))
    top, layer = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("layers.0."):
            layer[k.removeprefix("layers.0.")] = tuple(v.shape)
        elif not (cfg.tie_embeddings and k == "output.weight"):
            top[k] = tuple(v.shape)
    return top, layer


def _culprit(cfg: ModelConfig, size: int, names: dict[str, str] | None = None) -> str | None:
    """The config field (or product of fields) a tensor dimension of ``size`` comes from; ``names``: what
    the config file calls lmforge's fields (a Hugging Face config's ``hidden_size`` for ``dim``)."""
    for name, value in (("model.dim", cfg.dim), ("model.vocab_size", cfg.vocab_size),
                        ("model.n_heads x model.head_dim", cfg.q_dim),
                        ("model.n_kv_heads x model.head_dim", cfg.kv_dim),
                        ("model.ffn_hidden", cfg.hidden_dim), ("model.max_seq_len", cfg.max_seq_len),
                        ("model.head_dim", cfg.head_dim), ("model.type_vocab_size", cfg.type_vocab_size)):
        if value == size:
            for field, theirs in (names or {}).items():
                name = name.replace(f"model.{field}", theirs)
            return f"{name}={size:,}"
    return None


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str, fix: str,
                 require_all: bool = True, names: dict[str, str] | None = None) -> None:
    """Refuse a model config that disagrees with its weights' shapes (lmforge tensor names), in one line
    naming the field: ``where`` names the config (``'DIR/config.json'``), ``fix`` ends the message.
    Cheap whatever the config says (a ``dim`` of 10^9 or 10^9 layers): nothing is allocated. With
    ``require_all`` a tensor the config needs but the weights lack is refused too."""
    layers = {i for i in map(_layer_index, shapes) if i is not None}
    if layers and cfg.n_layers != max(layers) + 1:
        raise UserError(f"{where} says model.n_layers={cfg.n_layers:,} but the weights hold {max(layers) + 1} "
                        f"layers; {fix}")
    top, layer = _layer_shapes(cfg)
    if not layers and cfg.n_layers > 0 and shapes and require_all:
        raise UserError(f"{where} does not match the weights: they hold no layers (no 'layers.0.{next(iter(layer))}') "
                        f"but model.n_layers={cfg.n_layers:,}; {fix}")
    expected = list(top.items()) + [(f"layers.{i}.{k}", v) for i in range(cfg.n_layers if layers else 0)
                                    for k, v in layer.items()]
    for key, want in expected:
        got = shapes.get(key)
        if got is None:
            if require_all and shapes:
                raise UserError(f"{where} does not match the weights: they lack '{key}' that its config needs; "
                                f"{fix}")
            continue
        if tuple(got) != tuple(want):
            dims = [i for i in range(min(len(got), len(want))) if got[i] != want[i]]
            field = _culprit(cfg, want[dims[0]], names) if dims else None
            says = f"says {field} but the weights disagree" if field else "does not match the weights"
            raise UserError(f"{where} {says}: '{key}' is {list(got)}, the config makes it {list(want)}; {fix}")


def available_memory(device: str | torch.device = "cpu") -> tuple[int | None, str]:
    """(bytes free for new tensors on ``device``, how that is named), or (None, ...) when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free), f"free on {device}"
        except Exception:  # noqa: BLE001 - no driver / no such device: the allocation itself will say
            return None, str(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available in this machine's memory"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available in this machine's memory"
    except (ValueError, OSError, AttributeError):
        return None, "memory"


def check_fits_memory(cfg: ModelConfig, where: str, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> None:
    """Refuse, in one line, a model whose parameters alone (count x dtype bytes) exceed the memory
    ``device`` has available, before anything is allocated."""
    need = cfg.num_params() * torch.empty((), dtype=dtype).element_size()
    free, what = available_memory(device)
    if free is not None and need > free:
        raise UserError(f"{where} describes a model of {cfg.num_params():,} parameters (dim={cfg.dim:,}, "
                        f"n_layers={cfg.n_layers:,}, vocab_size={cfg.vocab_size:,}): {need / 2**30:,.1f} GiB in "
                        f"{str(dtype).removeprefix('torch.')}, over the {free / 2**30:,.1f} GiB {what}; use a "
                        "machine with more memory, or fix the sizes in config.json if they are wrong")


def check_model_dir(directory: str | os.PathLike, cfg: ModelConfig | None = None,
                    weights_name: str = WEIGHTS_NAME, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> ModelConfig:
    """A model dir's config checked against its weights' headers (and, given ``device``, against the memory
    there) before its model is built or its weights are read. Returns the config."""
    cfg = cfg if cfg is not None else read_config(directory)
    where = f"'{Path(directory) / CONFIG_NAME}'"
    fix = "fix config.json (or re-export the model dir from its run)"
    check_shapes(cfg, weight_shapes(directory, weights_name), where, fix)
    if device is not None:
        check_fits_memory(cfg, where, device, dtype)
    return cfg


def write_model_dir(directory: str | os.PathLike, cfg: ModelConfig, state_dict: dict[str, torch.Tensor] | None,
                    tokenizer_dir: str | os.PathLike | None = None, task: str = "lm",
                    extra: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    write_more: Callable[[Path], None] | None = None, **fields: Any) -> Path:
    """Write a complete model dir atomically (built in a temp dir beside the target, then renamed):
    config.json in the current metadata format (``fields``: labels, pooling, max_tokens, heads,
    tokenizer_hash), the weights (``None``: ``write_more`` writes them), the tokenizer files of
    ``tokenizer_dir``, then ``write_more(tmp)``."""
    with atomic_directory(directory) as tmp:
        write_json(tmp / CONFIG_NAME, model_config_json(to_dict(cfg), task, extra=extra, **fields))
        if state_dict is not None:
            save_weights(state_dict, tmp, max_shard_bytes)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if write_more is not None:
            write_more(tmp)
    return Path(directory)


def save_model_dir(model: torch.nn.Module, directory: str | os.PathLike, tokenizer_dir: str | None = None,
                   extra: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A language model (or encoder) as a model dir; ``extra``: provenance keys (and schema fields such
    as ``tokenizer_hash``, which go into the metadata block)."""
    return write_model_dir(directory, model.cfg, unique_state_dict(model), tokenizer_dir, extra=extra,
                           max_shard_bytes=max_shard_bytes)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "lmforge_tokenizer.json", "chat_template.jinja")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
    """Build the model from ``config.json`` and load its weights (strict: missing or extra keys fail)."""
    info = read_metadata(directory)
    if info.kind == "model" and info.task != "lm":
        what = {"classify": "a classifier", "reward": "a reward model"}[info.task]
        raise UserError(f"'{directory}' is {what} dir, not a language model; pass a language-model dir "
                        "(RUN/model of pretraining or SFT, or an imported model)")
    cfg = check_model_dir(directory, info.model_config(), device=device, dtype=dtype)  # before allocating
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    load_state_strict(model, load_weights(directory), directory)
    return model


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Load a Transformer's weights; any missing or extra key fails (a tied head is re-tied, not loaded)."""
    tied = model.cfg.tie_embeddings
    if tied:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k == "output.weight")]
    if missing or unexpected:
        raise UserError(f"weights in '{directory}' do not match its config.json: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; re-export the model dir")
    model.tie_weights()
