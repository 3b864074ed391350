"""The `parallel` config section and `ParallelDims`, which checks it against the world and the model.

Pure Python (no torch import) so config validation and the planner stay instant. The ranks' layout
(which ranks share a tensor-parallel or data-parallel group) is the DeviceMesh that
`lmforge.distributed.world.World` builds from these degrees, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import ConfigError

AC_POLICIES = ("none", "full", "selective", "matmuls", "layer-N")  # layer-N: N >= 1, e.g. layer-2
Dtype = Literal["bf16", "fp32"]
ParamDtype = Literal["auto", "bf16", "fp32"]


@dataclass
class ParallelConfig:
    """How one training job is spread over ranks; the same file works for any world size with dp_shard=-1."""

    dp_replicate: int = 1  # data-parallel replicas (DDP when dp_shard == 1, HSDP's outer dim otherwise)
    dp_shard: int = -1  # FSDP2 shard group size; -1 = whatever world / (dp_replicate * tp) leaves
    tp: int = 1  # tensor-parallel degree (DTensor colwise/rowwise plan on attention and MLP)
    sequence_parallel: bool = True  # with tp > 1: norms and residuals sharded along the sequence
    # per block (see `lmforge.distributed.apply`): none | full | selective (torchtitan's op SAC: every second
    # matmul recomputed) | matmuls (every matmul kept) | layer-N (full AC on every N-th block)
    activation_checkpoint: str = "none"
    compile: bool = False  # torch.compile each block's forward
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" for quick CPU checks)
    # FSDP2 compute / all-gather dtype on CUDA (master weights stay fp32; CPU always computes in fp32).
    # auto: bf16 unless the trainer's train.precision says fp32/fp16.
    param_dtype: ParamDtype = "auto"
    reduce_dtype: Dtype = "fp32"  # gradient reduce-scatter / all-reduce dtype
    reshard_after_forward: bool = True  # FSDP2 ZeRO-3 (True) or keep gathered until backward (ZeRO-2-like)
    timeout_s: float = 600.0  # process-group timeout; a dead rank makes the others exit within it

    def __post_init__(self) -> None:
        if self.dp_replicate < 1:
            raise ConfigError(f"parallel.dp_replicate={self.dp_replicate} must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 to fill the rest of the world")
        if self.tp < 1:
            raise ConfigError(f"parallel.tp={self.tp} must be >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"parallel.timeout_s={self.timeout_s} must be > 0 seconds")
        parse_ac_policy(self.activation_checkpoint)
        if not self.compile_backend:
            raise ConfigError("parallel.compile_backend must name a torch.compile backend, e.g. inductor")


def parse_ac_policy(name: str) -> tuple[str, int]:
    """``parallel.activation_checkpoint`` -> (policy, every N-th block): 'layer-N' -> ('full', N), else (name, 1).

    ConfigError naming the key and the choices for anything else."""
    if name in ("none", "full", "selective", "matmuls"):
        return name, 1
    if isinstance(name, str) and name.startswith("layer-") and name[6:].isascii() and name[6:].isdigit() and int(name[6:]) >= 1:
        return "full", int(name[6:])
    raise ConfigError(f"parallel.activation_checkpoint={name!r} is not one of 'none', 'full', 'selective', "
                      "'matmuls', 'layer-N' (N >= 1, e.g. 'layer-2')")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees for one world size; construct with :meth:`from_config`."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        if world_size < 1:
            raise ConfigError(f"world size {world_size} must be >= 1")
        rep, tp = cfg.dp_replicate, cfg.tp
        shard = cfg.dp_shard
        if shard == -1:
            if world_size % (rep * tp):
                raise ConfigError(
                    f"parallel.dp_replicate={rep} x parallel.tp={tp} = {rep * tp} does not divide the world size "
                    f"{world_size}; choose dp_replicate and tp whose product divides it "
                    f"(divisors: {', '.join(map(str, _divisors(world_size)))})"
                )
            shard = world_size // (rep * tp)
        if rep * shard * tp != world_size:
            raise ConfigError(
                f"parallel.dp_replicate={rep} x dp_shard={shard} x tp={tp} = {rep * shard * tp} != world size "
                f"{world_size}; set parallel.dp_shard=-1 to fill the rest, or change the degrees"
            )
        return cls(rep, shard, tp, world_size)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Data-parallel degree: how many slices the global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def data_parallel(self) -> Literal["none", "ddp", "fsdp", "hsdp"]:
        """Which data-parallel wrapper `parallelize` applies (see `lmforge.distributed.apply`)."""
        if self.dp_shard > 1:
            return "hsdp" if self.dp_replicate > 1 else "fsdp"
        if self.dp_replicate > 1:
            return "ddp"
        return "none"

    # ---- checks against the model --------------------------------------------------------------
    def check_model(self, model_cfg) -> None:
        """Raise ConfigError when the model cannot be split `tp` ways (heads, kv heads, widths, vocab)."""
        tp = self.tp
        if tp == 1:
            return
        checks = [
            ("model.n_heads", model_cfg.n_heads),
            ("model.n_kv_heads", model_cfg.n_kv_heads),
            ("model.hidden_dim (FFN width)", model_cfg.hidden_dim),
            ("model.dim", model_cfg.dim),
            ("model.vocab_size", model_cfg.vocab_size),
        ]
        for name, value in checks:
            if value % tp:
                ok = [d for d in _divisors(value) if d <= max(tp, 8) and self.world_size % d == 0]
                pad = (f", or pad it: model.vocab_size={-(-value // tp) * tp}" if name == "model.vocab_size"
                       else "")
                raise ConfigError(
                    f"parallel.tp={tp} does not divide {name}={value}; use a tp that divides it "
                    f"(e.g. {', '.join(map(str, ok))}){pad}"
                )
        if not model_cfg.lm_head and not model_cfg.final_norm:
            raise ConfigError(
                "parallel.tp>1 on a model without an LM head needs model.final_norm=true "
                "(the hidden states are gathered after it); use parallel.tp=1"
            )

    def describe(self) -> str:
        parts = [f"world={self.world_size}", f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}",
                 f"tp={self.tp}", f"wrapper={self.data_parallel}"]
        return " ".join(parts)
