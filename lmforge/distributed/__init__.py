"""Scale-out with PyTorch's own stack: process group (``process_group``), ParallelDims/DeviceMesh (``config``),
TP -> AC -> compile -> FSDP2 (``apply``), sharded init and load (``materialize``), ``watchdog``.

Import from the modules; this package file imports nothing, so config validation never imports torch.
"""
