"""Inference: a KV cache outside the model (``kv_cache``), sampling (``sampling``), a batched generation engine
(``engine.generate``), and continuous batching over per-slot caches for the server (``batcher``)."""
