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

BUILTIN_SOURCES = ("builtin", "verifiable")  # instruction sets shipped in src/prefloop/data


def install_line() -> str:
    """How to get the prefloop that made this card (it is not on PyPI), with its version."""
    from prefloop.artifacts import prefloop_source

    src = prefloop_source()
    at = f"prefloop {src['version']}" + (f" (git commit {src['git_commit'][:12]})"
                                         if src.get("git_commit") else "")
    return (f"Made with {at}. prefloop is not published on PyPI: in a copy of its source tree, "
            "run `pip install -e .` (or `make install`, which also fetches the embedded model), "
            "then:")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)


def _table(rows: list[tuple[str, object]], head: tuple[str, str]) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return lines


def adapter_card(recipe: Recipe, run_dir: Path, *, hyper: dict, final: dict, last_n: int,
                 mean_last: dict, dataset_repo_id: str | None, timing: dict,
                 evaluation: dict | None = None) -> str:
    """Markdown with YAML front matter for a PEFT LoRA adapter trained by `prefloop train`.

    hyper: name -> value of every training setting; final / mean_last: metric -> value at the last
    logged step and averaged over the last `last_n` logged steps; timing: seconds, tokens/s;
    evaluation: the held-out pairs' metrics at the end (train.eval_fraction), if any.
    """
    base = recipe.model.name
    base_id = hub_base_id(base)
    meta: dict = {}
    if base_id:
        meta["base_model"] = base_id
    meta["library_name"] = "peft"
    meta["tags"] = list(CARD_TAGS)
    dataset_repo_id = dataset_repo_id or recipe.push.dataset_repo_id
    if dataset_repo_id:
        meta["datasets"] = [dataset_repo_id]
    front = yaml.safe_dump(meta, sort_keys=False).strip()

    run = RunDir(run_dir)
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
        *([f"- Trained on prefloop's embedded copy of {base_id} (its Q4_1 GGUF, dequantised), "
           "not on the Hub's full-precision weights: `prefloop.load_model` below loads that "
           "exact base"] if base in EMBEDDED_SOURCE else []),
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
        *eval_section(evaluation),
        f"Training time: {_fmt(timing.get('train_seconds'))} s, "
        f"{_fmt(timing.get('tokens_per_second'))} tokens/s on {_fmt(timing.get('device'))}.",
        "",
        "## Use", "",
        "With prefloop (offline: the base model as trained on, this adapter applied; give the "
        "adapter folder or the run directory):", "",
        "```python",
        "import prefloop",
        "",
        f'model, tokenizer = prefloop.load_model("{run.adapter}")',
        "```",
        "",
        "With PEFT alone (`adapter_config.json` names the base model"
        + (" by its Hub id, which needs the Hub or its cache):" if base_id else ":"), "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter_ref(recipe, run)}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{adapter_ref(recipe, run)}")',
        "```",
        f"(base model: `{load_base}`)",
        "",
        "## Reproduce", "",
        "Save the recipe below as `recipe.yaml`. " + install_line(), "",
        "```bash",
        f"prefloop run --recipe recipe.yaml --output-dir runs/{recipe.name}",
        "```",
        "",
        "<details><summary>recipe.yaml</summary>", "",
        "```yaml", dump_recipe(recipe).rstrip(), "```", "", "</details>", "",
    ]
    return "\n".join(lines)


def eval_section(evaluation: dict | None) -> list[str]:
    """The held-out pairs' metrics (pairs never trained on), or a line saying there were none."""
    if not evaluation:
        return ["The metrics above are measured on the batches being trained on, not on held-out "
                "pairs (train.eval_fraction was 0).", ""]
    rows = [(k.removeprefix("eval_"), v) for k, v in evaluation.items()]
    return ["## Held-out pairs", "", "Pairs kept out of training (train.eval_fraction), scored "
            "by the final adapter:", "", *_table(rows, ("metric", "value")), ""]


def adapter_ref(recipe: Recipe, run: RunDir) -> str:
    """Where a reader finds the adapter: its Hub repo once pushed there, else the local folder."""
    return recipe.push.adapter_repo_id or str(run.adapter)


# -- the dataset card ----------------------------------------------------------------------------


def license_meta(source: str) -> tuple[dict, str]:
    """(YAML license keys, a sentence for the card) from the instruction source."""
    if source in BUILTIN_SOURCES:  # written for prefloop by its developers, shipped under its license
        return {"license": "apache-2.0"}, (
            f"The instructions are prefloop's built-in `{source}` set, written for prefloop by "
            "its developers (src/prefloop/data; the verifiable set is made by "
            "scripts/make_verifiable_instructions.py) and licensed with it under Apache-2.0.")
    if "lima" in source.lower():
        return {"license": "other", "license_name": "lima-derived",
                "license_link": LIMA_LICENSE_URL}, (
            f"License: other. The instructions come from LIMA (`{source}`), whose prompts are "
            f"under CC BY-NC-SA 4.0 ({LIMA_LICENSE_URL}: non-commercial, share-alike, "
            "attribution) and LIMA's own terms; this dataset inherits them.")
    return {"license": "unknown"}, (
        f"The instructions come from `{source}`; its license applies to them.")


def card_metadata(recipe: Recipe, n_rows: int, features, sizes: dict) -> dict:
    """The card's YAML; sizes: num_bytes (the rows in memory, Arrow) and download_size (the
    parquet files), as the Hub's dataset_info counts them."""
    from datasets import DatasetInfo

    meta = license_meta(recipe.instructions.source)[0]
    meta.update({
        "language": ["en"], "task_categories": ["text-generation"],
        "tags": ["dpo", "preference", "synthetic", "prefloop"],
        "size_categories": ["n<1K" if n_rows < 1000 else "1K<n<10K"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {**DatasetInfo(features=features)._to_yaml_dict(),
                         "splits": [{"name": "train", "num_bytes": sizes["num_bytes"],
                                     "num_examples": n_rows}],
                         "download_size": sizes["download_size"],
                         "dataset_size": sizes["num_bytes"]},
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


# every column the pairs dataset can have (stages/pairs.features), for the card
COLUMN_DOCS = {
    "id": "the instruction's id in the instruction source",
    "prompt": "the conversation before the answer: one user turn (the instruction); the system "
              "turn, if any, is in `prompt_text` only",
    "chosen": "the preferred answer, one assistant turn",
    "rejected": "the other answer, one assistant turn",
    "prompt_text": "the prompt exactly as the generator saw it, rendered by its chat template "
                   "(with the template's default system turn when it adds one)",
    "chosen_score": "the ranker's score of `chosen`",
    "rejected_score": "the ranker's score of `rejected`",
    "candidates": "every sampled response to the instruction, in sample order",
    "scores": "the ranker's score of each candidate (null: no valid score)",
    "ranker": "the ranker that scored the candidates",
    "generator": "the model that wrote the candidates",
    "constraints": "the instruction's verifiable constraints, as JSON (kind and arguments)",
    "candidate_checks": "per candidate, per constraint: its kind and whether the strict and the "
                        "loose reading pass",
    "candidate_hollow": "per candidate: why it counts as no answer (empty, refusal, a copy of "
                        "the instruction, ...), or null",
}


def column_lines(features) -> list[str]:
    """One bullet per column of `features`, in the dataset's order."""
    return [f"- `{name}`: {COLUMN_DOCS[name]}" for name in features]


def pairing_sentence(k: int, per_instruction: int) -> str:
    """How a pair is drawn from an instruction's scored responses."""
    if per_instruction == 1:
        return (f"{k} sampled responses per instruction, scored by a ranker; per instruction "
                "the highest-scored response is `chosen` and the lowest-scored is `rejected`.")
    return (f"{k} sampled responses per instruction, scored by a ranker; per instruction up to "
            f"{per_instruction} pairs, no response in two: the highest-scored vs the "
            "lowest-scored, then the highest vs the lowest of the rest, and so on.")


def dataset_card(recipe: Recipe, counts: dict, stats: dict, features,
                 ranker_lines: list[str], backends: list[str] | None = None, *,
                 sizes: dict, first_prompt: str) -> str:
    """README.md: YAML front matter for the Hub, then provenance, counts and reproduction.
    `backends`: the generation backends the responses record, when not the local engine;
    sizes: card_metadata's; first_prompt: the first pair's `prompt_text`, quoted."""
    g = recipe.generate
    front = yaml.safe_dump(card_metadata(recipe, counts["pairs"], features, sizes),
                           sort_keys=False, allow_unicode=True).strip()
    note = license_meta(recipe.instructions.source)[1]
    system = recipe.model.system_prompt
    shipped = (f"It started from the shipped recipe `{recipe.name}` (`prefloop run --recipe "
               f"{recipe.name}`); recipe.yaml records every override."
               if recipe.name in SHIPPED_RECIPES else f"Recipe name: `{recipe.name}`.")
    lines = [
        "---", front, "---", "",
        f"# Preference pairs from {recipe.model.name}", "",
        "Best-vs-worst DPO pairs built by prefloop (a command line tool installed from its "
        "source tree; it is not on PyPI): " + pairing_sentence(g.k, recipe.pairs.per_instruction)
        + " Columns follow TRL's conversational format, so `DPOTrainer` takes the dataset "
        "unchanged.", "",
        "## Provenance", "",
        f"- Generator: `{recipe.model.name}`" + _hub_note(recipe.model.name)
        + (f" at revision `{recipe.model.revision}`" if recipe.model.revision else "")
        + "".join(f", generated through `{b}`" for b in backends or []),
        f"- Sampling: k={g.k}, temperature {g.temperature}, top-p {g.top_p}, up to "
        f"{g.max_new_tokens} new tokens, seed {g.seed}; the model's own chat template, "
        + ("system prompt: " + repr(system) if system is not None else
           "no system message sent (the template adds its own default system turn if it has "
           "one: see `prompt_text`)"),
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
        *column_lines(features),
        "", "The first pair's prompt as the generator saw it (`prompt_text`):", "",
        "```text", first_prompt.rstrip("\n"), "```",
        "", "## Reproduce", "",
        "recipe.yaml beside this card is the resolved recipe of this run. " + shipped + " "
        + install_line(), "",
        "```bash", "prefloop run --recipe recipe.yaml --until pairs",
        "```",
        "", "## License", "", note + " Responses were generated by "
        f"`{recipe.model.name}`; its license and terms apply to them.", "",
    ]
    return "\n".join(lines)
