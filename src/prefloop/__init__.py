"""prefloop: preference data, DPO + LoRA, and self-rewarding iterative DPO."""

__version__ = "0.1.0"


def load_model(name_or_path, *, device: str | None = None, dtype: str = "auto"):
    """(model, tokenizer), offline where the model is local. `name_or_path`: an embedded model
    (e.g. "smollm2-135m-instruct"), a model folder or Hub id, or a trained adapter: a run
    directory (its train/adapter) or an adapter folder, applied on the base it was trained on."""
    from prefloop.models import load_pretrained

    return load_pretrained(name_or_path, device=device, dtype=dtype)


def comparison(run_dir):
    """The original-vs-DPO DataFrame (instruction, original, dpo) of a finished run directory."""
    from prefloop.stages.compare import comparison as table

    return table(run_dir)
