"""Accelerator presets: memory (vendor label, GB = 10^9 bytes) and dense peak matmul throughput.

Peaks are the vendors' dense (no 2:4 sparsity) tensor-core figures; MFU is measured against them.
Labels are slightly below what the devices report (an "80 GB" H100 has 85.0e9 bytes), which leaves
room for the CUDA context together with the planner's explicit overhead term.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense bf16 tensor-core peak, fp32 accumulate
    tf32_tflops: float  # dense TF32 tensor-core peak (fp32 training with TF32 matmuls)


GPUS: dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 SXM 80GB", 80, 989.4, 494.7),
    "h100-pcie": GPU("NVIDIA H100 PCIe 80GB", 80, 756.0, 378.0),
    "h200": GPU("NVIDIA H200 SXM 141GB", 141, 989.4, 494.7),
    "b200": GPU("NVIDIA B200 180GB", 180, 2250.0, 1100.0),
    "a100": GPU("NVIDIA A100 SXM 80GB", 80, 312.0, 156.0),
    "a100-40g": GPU("NVIDIA A100 40GB", 40, 312.0, 156.0),
    "l40s": GPU("NVIDIA L40S 48GB", 48, 362.05, 183.0),
    "4090": GPU("NVIDIA GeForce RTX 4090 24GB", 24, 165.2, 82.6),
    "mi300x": GPU("AMD Instinct MI300X 192GB", 192, 1307.4, 653.7),
}

GPUS_PER_NODE = 8  # tensor parallelism stays inside a node (NVLink); larger tp is not planned


def get_gpu(name: str) -> GPU:
    key = name.lower()
    if key not in GPUS:
        import difflib

        close = difflib.get_close_matches(key, GPUS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown --gpu '{name}'{hint} (choose one of {', '.join(GPUS)}, "
                          "or give --gpu-mem-gb and --peak-tflops)")
    return GPUS[key]
