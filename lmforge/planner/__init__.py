"""lmforge.planner: parameters, FLOPs, memory per GPU and time for a training or inference plan; no model
is built. The estimate in `estimate` (``PlanRequest``, ``estimate``, ``suggest``), modes in `modes`, activation
memory in `activations`, allocator levels in `allocator`, GPU presets in `hardware`, published measurements it
is held to in `calibration`. Nothing here imports torch.
"""
