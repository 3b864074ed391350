"""Model configs (``config.ModelConfig``), presets (``presets``) and the Transformer (``transformer``).

Import from the modules; this package file imports nothing, so config-only tools (`lmforge model info`,
the planner) never import torch.
"""
