"""The adapter card (train/adapter/README.md): provenance, hyper-parameters, metrics, usage.

TRL's own card has no hyper-parameters or results; this one links the adapter to its base model,
its preference dataset and the command that reproduces it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from prefloop.config import Recipe, dump_recipe

# The Hub repository each embedded model was converted from (for `base_model` metadata).
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
CARD_TAGS = ["dpo", "lora", "trl", "prefloop"]


def base_model_id(name: str) -> str | None:
    """The Hub id to cite as `base_model`, or None for a local folder (the Hub rejects paths)."""
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    if Path(name).expanduser().exists():
        return None
    return name


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)


def _table(rows: list[tuple[str, object]], head: tuple[str, str]) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return lines


def adapter_card(recipe: Recipe, run_dir: Path, *, hyper: dict, final: dict, last_n: int,
                 mean_last: dict, dataset_repo_id: str | None, timing: dict) -> str:
    """Markdown with YAML front matter for a PEFT LoRA adapter trained by `prefloop train`.

    hyper: name -> value of every training setting; final / mean_last: metric -> value at the last
    logged step and averaged over the last `last_n` logged steps; timing: seconds, tokens/s.
    """
    base = recipe.model.name
    base_id = base_model_id(base)
    meta: dict = {}
    if base_id:
        meta["base_model"] = base_id
    meta["library_name"] = "peft"
    meta["tags"] = list(CARD_TAGS)
    if dataset_repo_id:
        meta["datasets"] = [dataset_repo_id]
    front = yaml.safe_dump(meta, sort_keys=False).strip()

    run_dir = Path(run_dir)
    adapter_ref = recipe.push.adapter_repo_id or str(run_dir / "train" / "adapter")
    load_base = base_id or base
    dataset_line = (f"Dataset: {dataset_repo_id} on the Hub (local copy: {run_dir / 'pairs' / 'dataset'})"
                    if dataset_repo_id else "Dataset: local (pairs/dataset)")
    metric_rows = [(k, f"{_fmt(final.get(k))} / {_fmt(mean_last.get(k))}") for k in final]
    lines = [
        "---", front, "---", "",
        f"# DPO LoRA adapter for {base_id or base}", "",
        "A LoRA adapter trained with Direct Preference Optimization (Rafailov et al., 2023) by "
        "prefloop through TRL's `DPOTrainer`. The reference policy was the base model itself "
        "(the adapter disabled).", "",
        f"- Base model: {base_id or base}" + (f" (local name `{base}`)" if base_id and base_id != base
                                              else ""),
        f"- {dataset_line}",
        f"- Recipe: `{recipe.name}`",
        "",
        "## Hyper-parameters", "",
        *_table(list(hyper.items()), ("setting", "value")),
        "",
        "## Final training metrics", "",
        f"Last logged step / mean of the last {last_n} logged steps "
        "(rewards are β times the policy-to-reference log-ratio).", "",
        *_table(metric_rows, ("metric", "last / mean")),
        "",
        f"Training time: {_fmt(timing.get('train_seconds'))} s, "
        f"{_fmt(timing.get('tokens_per_second'))} tokens/s on {_fmt(timing.get('device'))}.",
        "",
        "## Use with PEFT", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{load_base}")',
        f'model = PeftModel.from_pretrained(base, "{adapter_ref}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{adapter_ref}")',
        "```",
        "",
        "## Reproduce", "",
        "Save the recipe below as `recipe.yaml`, then:", "",
        "```bash",
        f"prefloop run --recipe recipe.yaml --output-dir runs/{recipe.name}",
        "```",
        "",
        "<details><summary>recipe.yaml</summary>", "",
        "```yaml", dump_recipe(recipe).rstrip(), "```", "", "</details>", "",
    ]
    return "\n".join(lines)
