"""prefloop: preference data, DPO + LoRA, and self-rewarding iterative DPO."""

__version__ = "0.1.0"
