"""From the bytes tensors hold to the bytes the GPU gives up: three levels, each a stated term.

1. **allocated** — the peak of live tensors (`torch.cuda.max_memory_allocated`): state, saved
   activations, the backward transient and the parallel wrappers' buffers, summed by
   `lmforge.planner.estimate`.
2. **reserved** — what PyTorch's caching allocator holds at that peak (`max_memory_reserved`, the
   figure torchtitan logs). The allocator never returns segments to the driver during a step and
   cannot merge two separately allocated segments, so at the peak it also holds every freed segment
   the peak's requests cannot reuse (`stranded_bytes`). When the peak is the loss backward (the
   usual case with a large vocabulary), those are the compute-dtype logits, freed when the loss
   has upcast them (the fp32 gradient that follows needs a segment twice their size), and the
   forward tensors of one block that activation checkpointing discarded (their segments are far
   smaller than the loss's vocabulary-sized requests). When a block's backward is the peak, the
   freed loss segments are large enough to be split for it, and nothing is stranded.
3. **device** — reserved plus what lives outside the caching allocator: the CUDA context (driver,
   kernels; `CUDA_CONTEXT_GB`) and NCCL's communication buffers (`NCCL_GB`, once there is more than
   one GPU). These two are stated assumptions, not fitted: no published row below measures them.

The fits verdict compares the **device** figure with the GPU's memory.
"""

from __future__ import annotations

CUDA_CONTEXT_GB = 0.6  # CUDA 12 context with lazy kernel loading, as nvidia-smi shows for a PyTorch process
NCCL_GB = 0.5  # NCCL channels' send/receive buffers (NCCL_BUFFSIZE 4 MiB x channels x peers), > 1 GPU
LEVELS = ("allocated", "reserved", "device")


def stranded_bytes(*, loss_is_peak: bool, compute_logits: float, discarded_block: float) -> float:
    """Freed segments the caching allocator still holds at the peak (see the module doc)."""
    if not loss_is_peak:
        return 0.0
    return compute_logits + discarded_block


def outside_allocator_bytes(gpus: int, on_gpu: bool) -> float:
    """CUDA context and NCCL buffers: device memory PyTorch's allocator does not see."""
    if not on_gpu:
        return 0.0
    return (CUDA_CONTEXT_GB + (NCCL_GB if gpus > 1 else 0.0)) * 1e9
