"""The two Hub cards: the preference dataset's (pairs/dataset/README.md) and the adapter's
(train/adapter/README.md): provenance, settings, counts, metrics, how to reproduce and use.

TRL's own card has no hyper-parameters or results; ours link the adapter to its base model,
its preference dataset and the command that reproduces it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from prefloop.artifacts import RunDir
from prefloop.config import SHIPPED_RECIPES, Recipe, dump_recipe
from prefloop.models import EMBEDDED_SOURCE, hub_base_id

LIMA_LICENSE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"

CARD_TAGS = ["dpo", "lora", "trl", "prefloop"]

# prefloop is not published on PyPI: the cards say how to install it from its repository
INSTALL = ["git clone <prefloop repository URL> prefloop  # prefloop is not on PyPI",
           "pip install -e ./prefloop"]


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
    base_id = hub_base_id(base)
    meta: dict = {}
    if base_id:
        meta["base_model"] = base_id
    meta["library_name"] = "peft"
    meta["tags"] = list(CARD_TAGS)
    if dataset_repo_id:
        meta["datasets"] = [dataset_repo_id]
    front = yaml.safe_dump(meta, sort_keys=False).strip()

    run = RunDir(run_dir)
    adapter_ref = recipe.push.adapter_repo_id or str(run.adapter)
    load_base = base_id or base
    dataset_line = (f"Dataset: {dataset_repo_id} on the Hub (local copy: {run.dataset})"
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
        *INSTALL,
        f"prefloop run --recipe recipe.yaml --output-dir runs/{recipe.name}",
        "```",
        "",
        "<details><summary>recipe.yaml</summary>", "",
        "```yaml", dump_recipe(recipe).rstrip(), "```", "", "</details>", "",
    ]
    return "\n".join(lines)


# -- the dataset card ----------------------------------------------------------------------------


def license_meta(source: str) -> tuple[dict, str]:
    """(YAML license keys, a sentence for the card) from the instruction source."""
    if source == "builtin":
        return {"license": "apache-2.0"}, (
            "The instructions are prefloop's built-in set (Apache-2.0).")
    if "lima" in source.lower():
        return {"license": "other", "license_name": "lima-derived",
                "license_link": LIMA_LICENSE_URL}, (
            f"License: other. The instructions come from LIMA (`{source}`), whose prompts are "
            f"under CC BY-NC-SA 4.0 ({LIMA_LICENSE_URL}: non-commercial, share-alike, "
            "attribution) and LIMA's own terms; this dataset inherits them.")
    return {"license": "unknown"}, (
        f"The instructions come from `{source}`; its license applies to them.")


def card_metadata(recipe: Recipe, n_rows: int, features) -> dict:
    from datasets import DatasetInfo

    meta = license_meta(recipe.instructions.source)[0]
    meta.update({
        "language": ["en"], "task_categories": ["text-generation"],
        "tags": ["dpo", "preference", "synthetic", "prefloop"],
        "size_categories": ["n<1K" if n_rows < 1000 else "1K<n<10K"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {**DatasetInfo(features=features)._to_yaml_dict(),
                         "splits": [{"name": "train", "num_examples": n_rows}]},
    })
    return meta


def _hub_note(name: str) -> str:
    """Where an embedded model comes from on the Hub (nothing for Hub ids and folders)."""
    hub_id = hub_base_id(name) if name in EMBEDDED_SOURCE else None
    return f" (embedded copy of [{hub_id}](https://huggingface.co/{hub_id}))" if hub_id else ""


def generation_line(backend: str) -> str:
    """Who ran the generator: prefloop's own engine, or the named backend (model.backend)."""
    if backend == "local":
        return "Generation: prefloop's in-process engine (`model.backend: local`)"
    return f"Generation: the `{backend}` backend (`model.backend: {backend}`)"


def dataset_card(recipe: Recipe, counts: dict, stats: dict, features,
                 ranker_lines: list[str], backends: list[str] | None = None) -> str:
    """README.md: YAML front matter for the Hub, then provenance, counts and reproduction.
    `backends`: the generation backends the responses record, when not the local engine."""
    g = recipe.generate
    front = yaml.safe_dump(card_metadata(recipe, counts["pairs"], features), sort_keys=False,
                           allow_unicode=True).strip()
    note = license_meta(recipe.instructions.source)[1]
    system = recipe.model.system_prompt
    shipped = (f"It started from the shipped recipe `{recipe.name}` (`prefloop run --recipe "
               f"{recipe.name}`); recipe.yaml records every override."
               if recipe.name in SHIPPED_RECIPES else f"Recipe name: `{recipe.name}`.")
    lines = [
        "---", front, "---", "",
        f"# Preference pairs from {recipe.model.name}", "",
        "Best-vs-worst DPO pairs built by prefloop (a command line tool installed from its "
        "source repository; it is not on PyPI): "
        f"{g.k} sampled responses per instruction, scored by a ranker; per instruction the "
        "highest-scored response is `chosen` and the lowest-scored is `rejected`. Columns follow "
        "TRL's conversational format, so `DPOTrainer` takes the dataset unchanged.", "",
        "## Provenance", "",
        f"- Generator: `{recipe.model.name}`" + _hub_note(recipe.model.name)
        + (f" at revision `{recipe.model.revision}`" if recipe.model.revision else "")
        + "".join(f", generated through `{b}`" for b in backends or []),
        f"- Sampling: k={g.k}, temperature {g.temperature}, top-p {g.top_p}, up to "
        f"{g.max_new_tokens} new tokens, seed {g.seed}; the model's own chat template, "
        + ("system prompt: " + repr(system) if system is not None else "no system prompt"),
        f"- {generation_line(recipe.model.backend)}",
        f"- Instructions: `{recipe.instructions.source}` ({recipe.instructions.n_train} for "
        f"training, seed {recipe.instructions.seed})",
        *ranker_lines,
        "- Pairing: duplicates (byte-identical responses) removed first"
        + (", responses cut at the token limit excluded" if recipe.pairs.require_eos else "")
        + f"; ties (all scores equal) dropped; minimum margin {recipe.pairs.min_margin}; among "
        "equal best (worst) scores the lowest judge variance wins, then the shorter (longer) "
        "response"
        + (f"; chosen and rejected within a length ratio of {recipe.pairs.length_match} "
           "(shorter/longer, in tokens)" + ("" if recipe.pairs.length_match_all else
                                             " unless the instruction constrains length")
           if recipe.pairs.length_match else "")
        + (f"; up to {recipe.pairs.per_instruction} pairs per instruction, no response in two "
           "(best vs worst, then best vs worst of the rest)"
           if recipe.pairs.per_instruction > 1 else ""),
        "", "## Counts", "",
        "| what | count |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in counts.items()],
        "", "## Scores", "",
        "| statistic | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in stats.items()],
        "", "## Columns", "",
        "`id`, `prompt` (user turn, after the system turn if any), `chosen` / `rejected` "
        "(one assistant turn each), `prompt_text` (the rendered chat prompt), `chosen_score`, "
        "`rejected_score`, `candidates` (all responses, in sample order) with their `scores` "
        "(null: no valid score), `ranker`, `generator`.",
        "", "## Reproduce", "",
        "recipe.yaml beside this card is the resolved recipe of this run. " + shipped, "",
        "```bash", *INSTALL, "prefloop run --recipe recipe.yaml --until pairs",
        "```",
        "", "## License", "", note + " Responses were generated by "
        f"`{recipe.model.name}`; its license and terms apply to them.", "",
    ]
    return "\n".join(lines)
