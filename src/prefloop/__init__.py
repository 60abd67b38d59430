"""prefloop: preference data, DPO + LoRA, and self-rewarding iterative DPO."""

__version__ = "0.1.0"


def comparison(run_dir):
    """The original-vs-DPO DataFrame (instruction, original, dpo) of a finished run directory."""
    from prefloop.stages.compare import comparison as table

    return table(run_dir)
