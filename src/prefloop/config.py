"""One frozen dataclass per stage and the recipe that holds them: load, override, validate.

Precedence: dataclass defaults < recipe YAML < `--set section.key=value` overrides. Validation
happens here, before any model loads, and every error names the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from prefloop.errors import PrefloopError, redact_url

SHIPPED_RECIPES = ("default", "seed", "self-reward", "constraints-loop", "constraints-gpu")


@dataclass(frozen=True)
class ModelConfig:
    """The policy: an embedded name, a local folder or a Hub id."""

    # an embedded model (smollm2-135m-instruct), a local model folder or a Hub id
    name: str = "smollm2-135m-instruct"
    revision: str | None = None  # the Hub revision (branch, tag or commit) of model.name
    # weights' dtype; auto: bfloat16 on CUDA and on CPUs with native bf16 units (AMX or
    # AVX512-BF16, as torch reports them; PREFLOOP_CPU_BF16=0/1 overrides), float32 elsewhere
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    system_prompt: str | None = None  # None: the chat template's own default
    # who generates: prefloop's in-process engine (local), or a server (openai) that serves
    # /v1/completions with token-id prompts (engine.backends.BACKENDS)
    backend: Literal["local", "openai"] = "local"
    # backend "openai" only: the server (vLLM, SGLang, TGI, llama.cpp's llama-server; chat-only
    # hosted APIs do not qualify)
    base_url: str | None = None  # e.g. http://127.0.0.1:8080/v1
    server_model: str | None = None  # None: the one model the server lists
    api_key_env: str = "OPENAI_API_KEY"  # the env var holding the key (never printed)
    max_concurrency: int = 8  # requests in flight
    request_timeout: float = 600.0  # seconds per request
    max_retries: int = 3  # retries on 429/5xx/connection errors


@dataclass(frozen=True)
class InstructionsConfig:
    # "builtin", "verifiable" (built-in instructions with IFEval-style constraints), a local
    # .jsonl/.json/.csv/.parquet, or a Hub dataset id (GAIR/lima, google/IFEval, ...)
    source: str = "builtin"
    field: str | None = None  # None: auto-detect (GAIR/lima: first turn of `conversations`)
    split: str = "train"  # the split read from a Hub dataset
    hub_revision: str | None = None  # the Hub dataset's revision (None: its main branch)
    n_train: int = 50  # instructions drawn for generation, ranking and training
    n_heldout: int = 10  # other instructions kept aside for compare (never trained on)
    seed: int = 0  # seed of the draw of the train and held-out instructions
    # keep instructions of at least this many tokens (None: no minimum)
    min_tokens: int | None = None
    # keep instructions of at most this many tokens (None: no maximum)
    max_tokens: int | None = None
    kinds: str | None = None  # keep instructions whose constraints are all of these kinds (a,b)
    # true: keep every instruction with at least one constraint of `kinds`, its other
    # constraints (and their sentences) removed; needs each record's `task` field
    strip_other_kinds: bool = False
    # tuning: held-out = a validation split of the training records (by topic); the source's
    # held-out records are not read
    validation: bool = False


@dataclass(frozen=True)
class GenerateConfig:
    k: int = 5  # responses sampled per instruction
    temperature: float = 0.8  # sampling temperature (0: greedy)
    top_p: float = 0.95  # nucleus sampling: the smallest set of tokens with this probability mass
    max_new_tokens: int = 256  # a response is cut at this many tokens
    seed: int = 0  # sampling seed (each response has its own stream from it)
    batch_size: int | None = None  # None: automatic
    # true: one more candidate per instruction, the policy's own greedy answer (what compare and
    # a user see), so that a greedy failure such as a repetition loop can be ranked and rejected
    # on-policy; it is sample k, marked "greedy" (docs/findings.md §2.8)
    greedy_candidate: bool = field(default=False, metadata={"added": "0.2"})


@dataclass(frozen=True)
class RankConfig:
    # who scores the responses: an LLM judge, PairRM, or the verifiable constraints
    ranker: Literal["judge", "pairrm", "constraints"] = "judge"
    # a second ranker whose score breaks ties between equally ranked responses (and, with
    # pairs.quality_gate, vetoes a pair whose chosen response it scores below the rejected one)
    quality: Literal["none", "judge", "pairrm"] = "none"
    judge_model: str | None = None  # None: the policy judges itself
    judge_revision: str | None = None  # revision of judge_model (None with the policy: its own)
    judge_template: str = "yuan2024"  # the judge prompt, prompts/judge_<name>.txt
    judge_samples: int = 3  # judgments sampled per response, their scores averaged
    judge_temperature: float = 0.7  # the judge's sampling temperature
    judge_top_p: float = 0.9  # the judge's nucleus sampling
    judge_max_new_tokens: int = 256  # a judgment is cut at this many tokens
    # non-paper: when a judgment has no parsable score, append "Score:" to it and score it
    # Σ d·p(d) over the judge's next-token probabilities of 0-5 (G-Eval style; for small
    # judges that lose the format); counted as forced in the manifest
    judge_force_score: bool = False
    min_valid: int = 1  # parsable judgments a response needs to get a score
    pairrm_model: str = "llm-blender/PairRM"  # the PairRM checkpoint (a Hub id or a folder)
    pairrm_revision: str | None = None  # None: the pinned revision
    batch_size: int | None = None  # responses scored per batch (None: automatic; PairRM: 32)
    seed: int = 0  # seed of the judge's sampling


@dataclass(frozen=True)
class PairsConfig:
    min_margin: float = 0.0  # chosen's score must exceed rejected's by more than this
    require_eos: bool = False  # drop responses cut at max_new_tokens before pairing
    # > 0: chosen and rejected must be within this ratio of lengths (shorter/longer, in
    # tokens) unless the instruction's constraints are about length (constraints ranker)
    length_match: float = 0.0
    # true: length_match holds for instructions that constrain length too (their pairs then
    # contrast the other constraints, or the count near its bound, never a long vs a short answer)
    length_match_all: bool = False
    quality_gate: bool = False  # drop pairs whose chosen has the lower rank.quality score
    # up to this many pairs per instruction, no response in two of them: best vs worst, then
    # best vs worst of the rest, ... (1: the paper's single best-vs-worst pair)
    per_instruction: int = 1


@dataclass(frozen=True)
class TrainConfig:
    # TRL's DPO loss (sigmoid: the DPO paper's), or a comma-separated mix such as sigmoid,sft
    loss_type: str = "sigmoid"
    beta: float = 0.1  # DPO's β: how far the policy may move from the reference
    learning_rate: float = 5e-6  # peak learning rate of the LoRA weights
    epochs: float = 1.0  # passes over the pairs (fractions allowed)
    max_steps: int = -1  # > 0: stop after this many optimizer steps, whatever epochs says
    batch_size: int = 4  # pairs per device per forward/backward
    grad_accum: int = 1  # batches accumulated per optimizer step
    warmup_ratio: float = 0.1  # fraction of the steps with a rising learning rate
    # learning-rate schedule (transformers' names: cosine, linear, constant, ...)
    scheduler: str = "cosine"
    max_length: int = 1024  # longest prompt + response in tokens; longer pairs are truncated
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale α (the update is α/r · B·A)
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    # layers that get LoRA: all-linear or comma-separated names (q_proj,v_proj)
    target_modules: str = "all-linear"
    gradient_checkpointing: bool = False  # recompute activations in the backward to save memory
    qlora: bool = False  # train on a 4-bit (bitsandbytes NF4) base: CUDA only
    seed: int = 0  # seed of the LoRA initialisation and the data order
    logging_steps: int = 1  # optimizer steps between two lines of train/log.jsonl
    engine: Literal["trl", "fast"] = "trl"  # "fast": prefloop.dpo.FastDPOTrainer
    # FastDPOTrainer's settings (prefloop.dpo.FastDPOConfig's fields, same names and defaults) are
    # used with engine "fast" only (ignored with "trl").
    #
    # engine fast: activation memory a chunk of pairs may hold, in GiB (>= 0); null: what TRL's
    # padded layout would need for this batch size and the longest pair
    fast_activation_budget_gb: float | None = None
    # engine fast: smallest chunk of pairs given a forward/backward of its own (> 0)
    fast_min_chunk_tokens: int = 8192
    # engine fast: RMSNorm and SwiGLU save less for the backward (Llama/Mistral/Qwen)
    fast_lean_activations: bool = True
    # experiment trackers the trainer also logs to, comma-separated: none, or transformers'
    # report_to names (tensorboard, wandb, trackio, mlflow, ...); each needs its own package
    report_to: str = "none"
    # > 0: this fraction of the pairs (at least one pair) is held out of training, seeded by
    # train.seed, and scored every eval_steps steps and at the end (eval reward accuracy, margins)
    eval_fraction: float = 0.0
    eval_steps: int = 10  # with eval_fraction > 0: optimizer steps between two evaluations
    # a checkpoint (adapter, optimizer, scheduler, RNG, step) every this many optimizer steps,
    # from which a killed train resumes; 0: none (a killed train starts again at step 1)
    save_steps: int = 10


@dataclass(frozen=True)
class CompareConfig:
    temperature: float = 0.0  # greedy
    top_p: float = 1.0  # nucleus sampling of both models' answers
    max_new_tokens: int = 256  # an answer is cut at this many tokens
    seed: int = 0  # sampling seed of both models' answers
    verdict: bool = True  # a ranker's win-rate of DPO over the original
    # the ranker that gives that win-rate (None: rank.ranker); instructions with constraints
    # are also checked objectively, whatever ranker this names
    ranker: Literal["judge", "pairrm", "constraints"] | None = None
    view: Literal["dataframe", "blocks"] = "dataframe"  # how the table is printed
    show_rows: int = 10  # rows of the table printed (comparison.csv/.md keep every row)
    # transfer check: this many held-out-topic instructions whose constraints are all of kinds
    # NOT in instructions.kinds (untrained kinds), a seeded draw, answered by both models and
    # checked like the held-out set; 0: no transfer check. It applies where instructions.kinds
    # is set and the source's records name their split (instructions.source=verifiable: 54 such
    # records); elsewhere (LIMA prompts, a file of plain instructions) compare runs without it
    # and prints one line saying why. Each one
    # costs two greedy answers (original and DPO; the original's come from the answer cache
    # after the first run); the recipes give their own value and say why
    transfer_n: int = field(default=0, metadata={"added": "0.2"})


@dataclass(frozen=True)
class PushConfig:
    # the Hub dataset repo `prefloop push dataset` uploads to (None: do not push)
    dataset_repo_id: str | None = None
    # the Hub model repo `prefloop push adapter` uploads to (None: do not push)
    adapter_repo_id: str | None = None
    private: bool = False  # create the Hub repos private


@dataclass(frozen=True)
class IterateConfig:
    rounds: int = 2  # self-rewarding rounds: M1 trains M2, M2 trains M3, ...
    # new prompts each round: written by the model from few-shot examples (self-instruct), or taken
    # from the seed instructions
    prompt_source: Literal["self-instruct", "seed"] = "self-instruct"
    prompt_model: str | None = None  # None: the starting model, kept fixed across rounds
    prompts_per_round: int = 50  # new training prompts per round
    fewshot_seed: int = 6  # seed instructions shown in each self-instruct prompt (paper: 6)
    fewshot_generated: int = 2  # earlier generated prompts shown beside them (paper: 2)
    prompt_temperature: float = 0.6  # sampling temperature of the new prompts
    prompt_top_p: float = 0.9  # nucleus sampling of the new prompts
    prompt_max_new_tokens: int = 128  # a new prompt is cut at this many tokens
    # a new prompt whose ROUGE-L with a kept one reaches this is dropped as a near copy
    rouge_threshold: float = 0.7
    min_words: int = 4  # new prompts shorter than this many words are dropped
    max_words: int = 150  # new prompts longer than this many words are dropped
    n_candidates: int = 4  # responses sampled per prompt, judged by the current model
    temperature: float = 0.7  # sampling temperature of those responses
    top_p: float = 0.9  # nucleus sampling of those responses
    max_new_tokens: int = 256  # a response is cut at this many tokens
    judge_samples: int = 3  # M_t's self-judgments per response, averaged (paper: 3)
    eval_prompts: int = 10  # held-out prompts on which each round's model is compared
    seed: int = 0  # seed of the prompts, samples and judgments


@dataclass(frozen=True)
class Recipe:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    instructions: InstructionsConfig = field(default_factory=InstructionsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    push: PushConfig = field(default_factory=PushConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Recipe) if f.name != "name"}
_HINTS = {cls: typing.get_type_hints(cls) for cls in
          [ModelConfig, InstructionsConfig, GenerateConfig, RankConfig, PairsConfig, TrainConfig,
           CompareConfig, PushConfig, IterateConfig]}
_SECTION_TYPES = {name: typing.get_type_hints(Recipe)[name] for name in SECTIONS}


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error may echo it: bounded in depth, items and length (a YAML alias bomb
    expands to more text than any terminal holds)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown(where: str, key: str, valid: list[str]) -> PrefloopError:
    key = key[:80]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return PrefloopError(f"{where}: unknown key {shown(key)} ({hint})")


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check `value` against a type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except PrefloopError as e:
                errors.append(str(e))
        raise PrefloopError(errors[0] if errors else f"{where}: invalid value {shown(value)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if not isinstance(value, typing.Hashable) or value not in choices:
            raise PrefloopError(f"{where}: {shown(value)} is not one of {', '.join(map(str, choices))}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrefloopError(f"{where}: expected a number, got {shown(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PrefloopError(f"{where}: expected an integer, got {shown(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise PrefloopError(f"{where}: expected true or false, got {shown(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise PrefloopError(f"{where}: expected a string, got {shown(value)}")
        return value
    raise PrefloopError(f"{where}: unsupported type {hint}")


# TRL's (transformers' TrainingArguments') names, accepted for the recipe's own keys
ALIASES: dict[type, dict[str, str]] = {TrainConfig: {
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "epochs", "lr_scheduler_type": "scheduler"}}


def _canonical_keys(where: str, cls: type, data: dict) -> dict:
    """`data` with TRL's aliases renamed to the recipe's keys; both names at once is an error."""
    aliases = ALIASES.get(cls, {})
    out: dict = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in out:
            raise PrefloopError(f"{where}: '{key}' and '{name}' name the same setting; keep one")
        out[name] = value
    return out


def _build_section(where: str, cls: type, data: Any, base: Any) -> Any:
    if not isinstance(data, dict):
        raise PrefloopError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = _HINTS[cls]
    valid = [f.name for f in fields(cls)]
    values = {}
    for key, value in _canonical_keys(where, cls, data).items():
        if key not in hints:
            raise _unknown(where, str(key), valid)
        values[key] = _coerce(f"{where}.{key}", value, hints[key])
    section = replace(base, **values)
    _check_ranges(where, section)
    if cls is ModelConfig:
        _check_server(where, section)
    return section


# The allowed range of every numeric setting, by key (the same key means the same thing in every
# section): (low, low included, high, high included); None is unbounded. A test walks every
# numeric field of every section and fails when one has no entry here.
_INF = None
_POS_INT = (0, False, _INF, False)  # sizes and counts (integers): >= 1
_NONNEG = (0, True, _INF, False)
_UNIT_OPEN = (0, True, 1, False)  # [0, 1)
RANGES: dict[str, tuple] = {
    **dict.fromkeys(["k", "n_train", "max_new_tokens", "judge_samples", "judge_max_new_tokens",
                     "min_valid", "batch_size", "grad_accum", "max_length", "lora_r",
                     "lora_alpha", "rounds", "prompts_per_round", "n_candidates", "eval_prompts",
                     "logging_steps", "fast_min_chunk_tokens", "show_rows", "max_concurrency",
                     "per_instruction", "min_tokens", "max_tokens", "min_words", "max_words",
                     "fewshot_seed", "prompt_max_new_tokens", "eval_steps"], _POS_INT),
    **dict.fromkeys(["seed", "n_heldout", "min_margin", "fast_activation_budget_gb",
                     "fewshot_generated", "save_steps", "transfer_n"], _NONNEG),  # save_steps 0: no checkpoints
    **dict.fromkeys(["temperature", "judge_temperature", "prompt_temperature"], _NONNEG),
    **dict.fromkeys(["top_p", "judge_top_p", "prompt_top_p", "rouge_threshold"],
                    (0, False, 1, True)),
    **dict.fromkeys(["lora_dropout", "warmup_ratio", "length_match", "eval_fraction"],
                    _UNIT_OPEN),
    "beta": (0, False, _INF, False),
    "learning_rate": (0, False, 1, True),
    "epochs": (0, False, _INF, False),
    "max_steps": (0, False, _INF, False),  # or -1: train for `epochs`
    "request_timeout": (0, False, _INF, False),
    "max_retries": (0, True, 100, True),
}


def _in_range(v: float, rng: tuple) -> bool:
    lo, lo_in, hi, hi_in = rng
    return ((lo is None or v > lo or (lo_in and v == lo))
            and (hi is None or v < hi or (hi_in and v == hi)))


def _range_text(rng: tuple) -> str:
    lo, lo_in, hi, hi_in = rng
    if hi is None:
        return f"must be {'>=' if lo_in else '>'} {lo:g}"
    return f"must be in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _check_ranges(where: str, section: Any) -> None:
    import math

    for f in fields(section):
        v = getattr(section, f.name)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise PrefloopError(f"{where}.{f.name}: must be a finite number, got {v}")
        rng = RANGES[f.name]
        if not _in_range(v, rng) and not (f.name == "max_steps" and v == -1):
            extra = " (or -1: train for train.epochs)" if f.name == "max_steps" else ""
            raise PrefloopError(f"{where}.{f.name}: {_range_text(rng)}{extra}, got {v}")
    _check_pairs_of_keys(where, section)


def _check_pairs_of_keys(where: str, section: Any) -> None:
    """Bounds given as two keys of one section: the low one may not exceed the high one."""
    for low, high in (("min_tokens", "max_tokens"), ("min_words", "max_words")):
        lo, hi = getattr(section, low, None), getattr(section, high, None)
        if lo is not None and hi is not None and lo > hi:
            raise PrefloopError(f"{where}.{low}: {lo} is larger than {high} ({hi}); "
                                f"lower {low} or raise {high}")


def _check_server(where: str, m: ModelConfig) -> None:
    if m.backend == "openai" and not m.base_url:
        raise PrefloopError(f"{where}.base_url: required with backend openai, e.g. "
                            "http://127.0.0.1:8080/v1")
    if m.base_url and not m.base_url.startswith(("http://", "https://")):
        raise PrefloopError(f"{where}.base_url: expected an http:// or https:// URL, "
                            f"got {shown(redact_url(m.base_url))}")


def recipe_from_dict(data: Any, where: str = "recipe", base: Recipe | None = None) -> Recipe:
    """Build a validated Recipe from a parsed YAML mapping layered over `base` (defaults)."""
    base = base or Recipe()
    if data is None:
        return base
    if not isinstance(data, dict):
        raise PrefloopError(f"{where}: the recipe must be a YAML mapping of sections")
    valid = ["name", *SECTIONS]
    updates: dict[str, Any] = {}
    for key, value in data.items():
        if key == "name":
            updates["name"] = check_name(f"{where}: name", _coerce(f"{where}: name", value, str))
        elif key in SECTIONS:
            cls = _SECTION_TYPES[key]
            updates[key] = _build_section(f"{where}: {key}", cls, value or {}, getattr(base, key))
        else:
            raise _unknown(where, str(key), valid)
    return replace(base, **updates)


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise DuplicateKey(key, seen[key], line)
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"key {shown(key)} is given twice, on lines {first} and {second}")
        self.key, self.first, self.second = key, first, second


def shipped_recipe_path(name: str) -> Path:
    return Path(str(resources.files("prefloop") / "recipes" / f"{name}.yaml"))


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by shipped name or path, then apply `section.key=value` overrides."""
    from prefloop.artifacts import read_text

    path = _recipe_path(recipe)
    try:
        text = read_text(path)  # not UTF-8, or a folder: one error naming the file and the fix
    except OSError as e:
        raise PrefloopError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: no Python objects
    except DuplicateKey as e:
        raise PrefloopError(f"{path}:{e.second}: {e}; keep one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PrefloopError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    r = recipe_from_dict(data, where=str(path))
    return apply_overrides(r, overrides or [])


def _recipe_path(recipe: str | Path | None) -> Path:
    if recipe is None:
        return shipped_recipe_path("default")
    if str(recipe) in SHIPPED_RECIPES:
        return shipped_recipe_path(str(recipe))
    path = Path(recipe)
    if not path.exists():
        raise PrefloopError(
            f"{path}: recipe not found; give a YAML file or one of: {', '.join(SHIPPED_RECIPES)}"
        )
    return path


def apply_overrides(r: Recipe, overrides: list[str]) -> Recipe:
    """Apply `section.key=value` strings; values are parsed as YAML scalars."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise PrefloopError(f"--set {item}: expected section.key=value, e.g. train.beta=0.05")
        section, dot, name = key.strip().partition(".")
        if section == "name" and not dot:
            r = replace(r, name=check_name("--set name", raw))
            continue
        if not dot:
            raise PrefloopError(f"--set {item}: expected section.key=value, e.g. train.beta=0.05")
        value = _set_value(raw)
        if value is not None and not isinstance(value, str) and _takes_text(section, name):
            value = raw  # `[INST] be brief` reads as a YAML list; the key wants the text
        nested.setdefault(section, {})[name] = value
    return recipe_from_dict(nested, where="--set", base=r) if nested else r


def _set_value(raw: str) -> Any:
    """A --set value: a YAML scalar (numbers, true, null, quoted text); text YAML cannot read
    (`[INST] be brief`, `@bot`, `%x`) is taken as the string it is."""
    if not raw.strip():
        return None
    try:
        return yaml.load(raw, Loader=RecipeLoader)
    except yaml.YAMLError:
        return raw


def _takes_text(section: str, key: str) -> bool:
    """True when section.key is a string setting (str or str | None)."""
    cls = _SECTION_TYPES.get(section)
    hint = _HINTS[cls].get(key) if cls else None
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and set(typing.get_args(hint)) == {str, type(None)})


_PLAIN_NAME = re.compile(r"[\w][\w.+-]*")


def check_name(where: str, name: str) -> str:
    """A recipe name is a folder name under runs/: no path separators, no '..', not absolute."""
    if not _PLAIN_NAME.fullmatch(name) or ".." in name or len(name) > 100:
        raise PrefloopError(f"{where}: {shown(name)} is not a plain name (letters, digits, "
                            "'.', '_', '-', no '/' or '..'); rename it, or choose the folder "
                            "with --output-dir")
    return name


def redacted(r: Recipe) -> Recipe:
    """The recipe as it may be written or shown: the server URL without its credentials."""
    base_url = r.model.base_url
    if not base_url or redact_url(base_url) == base_url:
        return r
    return replace(r, model=replace(r.model, base_url=redact_url(base_url)))


def recipe_to_dict(r: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(redacted(r))


def dump_recipe(r: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(r), sort_keys=False, allow_unicode=True)
