"""Scale-out with PyTorch's own stack: process group (``process_group``), the World that owns the one DeviceMesh
(``world``), checked collectives (``collectives``), TP -> AC -> compile -> FSDP2 (``apply``), sharded init and
load (``materialize``), ``watchdog``.

Import from the modules; this package file imports nothing, so config validation never imports torch.
"""
