"""Stage 5: DPO + LoRA on the preference pairs, through TRL's `DPOTrainer`.

DPO (Rafailov et al. 2023, eq. 7), per pair (x, y_w, y_l):

    L = -log σ(β [log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x)])

πθ is the base model plus a LoRA adapter; π_ref is the same base with the adapter disabled, so
no second copy of the weights is held. At step 0 the adapter is a no-op (LoRA B = 0), hence
πθ = π_ref and every reward β·log(πθ/π_ref) is 0: we check that and record it in the manifest.

Resumability: a finished stage is skipped (manifest). Every train.save_steps optimizer steps the
trainer writes a checkpoint (transformers' own: adapter, optimizer, scheduler, RNG states, step),
marked complete only once whole; a killed train resumes from the last complete one and ends with
the adapter an uninterrupted run gives (tests/test_faults.py). With save_steps 0 it restarts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prefloop import distributed
from prefloop.artifacts import (
    RunDir,
    Stage,
    Upstream,
    append_jsonl,
    atomic_write_text,
    read_jsonl,
    save_figure,
)
from prefloop.config import Recipe, TrainConfig
from prefloop.errors import PrefloopError

if TYPE_CHECKING:  # torch loads with a model: a command that refuses its settings skips it
    import torch

# Every loss `DPOTrainer` 1.16 implements (its `_compute_loss`); tests check the list against TRL.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
LOG_KEYS = ("step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "learning_rate")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
EVAL_KEYS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins",
             "eval_rewards/accuracies")
LAST_N = 10  # the card's "mean of the last N logged steps"
CHECKPOINT_DONE = "prefloop-complete"  # written into a checkpoint folder once it is whole


# --- options ---------------------------------------------------------------------------------

def parse_loss_types(value: str) -> list[str]:
    """'sigmoid' or a comma-separated mix such as 'sigmoid,sft' (equal weights), checked."""
    types = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in types if t not in TRL_LOSS_TYPES]
    if not types or bad:
        raise PrefloopError(f"train.loss_type: unknown loss {', '.join(bad) or repr(value)}; use "
                            f"one of {', '.join(TRL_LOSS_TYPES)} (comma-separated to mix)")
    return types


def parse_target_modules(value: str) -> str | list[str]:
    """'all-linear' (every linear layer but the output head) or a comma-separated list."""
    if value.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise PrefloopError("train.target_modules: empty; use all-linear or names such as "
                            "q_proj,v_proj")
    if "lm_head" in names:
        raise PrefloopError("train.target_modules: LoRA on lm_head is not supported (TRL computes "
                            "log-probs from lm_head.weight directly); remove lm_head")
    return names


def parse_report_to(value: str) -> list[str]:
    """train.report_to as transformers' list: [] for none; each tracker known and installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [t.strip() for t in value.split(",") if t.strip()]
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if bad:
        raise PrefloopError(f"train.report_to: unknown tracker {', '.join(bad)}; use none or "
                            f"some of {', '.join(INTEGRATION_TO_CALLBACK)} (comma-separated)")
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        raise PrefloopError(f"train.report_to: {', '.join(missing)} is not installed; "
                            f"pip install {' '.join(missing)}, or set train.report_to=none")
    return names


def check_options(cfg: TrainConfig, device: torch.device) -> None:
    """Fail before any model loads on settings this machine or TRL cannot honour."""
    from transformers import SchedulerType

    parse_loss_types(cfg.loss_type)
    parse_report_to(cfg.report_to)
    parse_target_modules(cfg.target_modules)
    schedulers = [s.value for s in SchedulerType]
    if cfg.scheduler not in schedulers:
        raise PrefloopError(f"train.scheduler: unknown scheduler '{cfg.scheduler}'; use one of "
                            f"{', '.join(schedulers)}")
    if cfg.engine not in ("trl", "fast"):
        raise PrefloopError(f"train.engine: '{cfg.engine}' is not one of trl, fast")
    if cfg.qlora:
        if device.type != "cuda":
            raise PrefloopError("train.qlora: QLoRA (4-bit bitsandbytes base) needs a CUDA GPU; "
                                "set train.qlora=false on this machine")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise PrefloopError("train.qlora: needs the bitsandbytes package; pip install "
                                "'prefloop[qlora]' or set train.qlora=false")


# --- data ------------------------------------------------------------------------------------

def load_pairs(run_dir: Path):
    """The pairs dataset with only the columns TRL reads (conversational prompt/chosen/rejected)."""
    from prefloop.stages.pairs import read_dataset

    path = RunDir(run_dir).dataset
    if not (path / "data").is_dir():
        raise PrefloopError(f"{path}: pairs dataset not found; run `prefloop pairs --output-dir "
                            f"{run_dir}` first")
    # Count rows from the parquet footers first: `datasets` cannot load a 0-row parquet file.
    import pyarrow.parquet as pq

    if sum(pq.ParquetFile(f).metadata.num_rows for f in (path / "data").glob("*.parquet")) == 0:
        raise PrefloopError(f"{path}: the pairs dataset has no rows; give more instructions, "
                            "lower pairs.min_margin, or raise generate.k, then re-run prefloop pairs")
    ds = read_dataset(path)
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise PrefloopError(f"{path}: missing column(s) {', '.join(missing)}; re-run "
                            "`prefloop pairs --force`")
    return ds.select_columns(list(PAIR_COLUMNS))


def split_pairs(pairs, cfg: TrainConfig):
    """(train pairs, eval pairs or None): train.eval_fraction of the pairs, at least one, drawn
    with train.seed; at least one pair is left to train on."""
    if cfg.eval_fraction <= 0:
        return pairs, None
    n_eval = max(1, round(cfg.eval_fraction * len(pairs)))
    if n_eval >= len(pairs):
        raise PrefloopError(f"train.eval_fraction: {cfg.eval_fraction} of {len(pairs)} pair(s) "
                            "leaves none to train on; lower it or set it to 0")
    split = pairs.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
    return split["train"], split["test"]


# --- trainer ---------------------------------------------------------------------------------

def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=parse_target_modules(cfg.target_modules), bias="none",
                      task_type="CAUSAL_LM")


def _device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    import torch

    if isinstance(model, str):  # QLoRA: TRL loads the 4-bit model itself, on CUDA, bf16 compute
        return torch.device("cuda"), torch.bfloat16
    p = next(model.parameters())
    return p.device, p.dtype


def fast_settings(cfg: TrainConfig) -> dict:
    """The recipe's FastDPOTrainer settings: TrainConfig's fast_* keys, named as in FastDPOConfig."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.startswith("fast_")}


def dpo_config(cfg: TrainConfig, out_dir: Path, device: torch.device, dtype: torch.dtype,
               model_init_kwargs: dict | None = None):
    """DPOConfig with every default that matters set explicitly (TRL's bf16=True and
    gradient_checkpointing=True defaults are wrong for a CPU run). With engine "fast": a
    FastDPOConfig, which also carries the recipe's fast_* settings (TRL's DPOConfig refuses them)."""
    from dataclasses import fields

    import torch
    from trl import DPOConfig

    config_cls, extra = DPOConfig, {}
    if cfg.engine == "fast":
        from prefloop.dpo import FastDPOConfig

        config_cls, extra = FastDPOConfig, fast_settings(cfg)
    cuda = device.type == "cuda"
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (old name warns)
    names = {f.name for f in fields(DPOConfig)}
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in names
            else "gradient_checkpointing")
    return config_cls(
        **{ckpt: cfg.gradient_checkpointing}, **extra,
        output_dir=str(out_dir), report_to=parse_report_to(cfg.report_to), seed=cfg.seed,
        **checkpoint_settings(cfg),
        data_seed=cfg.seed, use_cpu=not cuda,
        bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16,
        disable_dropout=True,
        loss_type=parse_loss_types(cfg.loss_type), beta=cfg.beta,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,  # < 1: a fraction of the steps (transformers 5)
        lr_scheduler_type=cfg.scheduler, max_length=cfg.max_length,
        logging_steps=cfg.logging_steps, dataloader_pin_memory=cuda,
        model_init_kwargs=model_init_kwargs,
        # Under DDP: every LoRA weight gets a gradient each step, so skip the per-step search
        # for unused parameters (it costs a graph walk and breaks with activation checkpointing).
        ddp_find_unused_parameters=False,
    )


def checkpoint_settings(cfg: TrainConfig) -> dict:
    """Checkpoints (two kept: the newest may be cut by a kill) and the eval schedule."""
    out = {"save_strategy": "steps" if cfg.save_steps else "no",
           "save_steps": cfg.save_steps or 500, "save_total_limit": 2}
    if cfg.eval_fraction > 0:
        out.update(eval_strategy="steps", eval_steps=cfg.eval_steps,
                   per_device_eval_batch_size=cfg.batch_size)
    return out


def trainer_class(engine: str):
    if engine == "fast":
        from prefloop.dpo import FastDPOTrainer

        return FastDPOTrainer
    from trl import DPOTrainer

    return DPOTrainer


def build_trainer(model, tokenizer, dataset, recipe: Recipe, out_dir: Path, callbacks,
                  eval_dataset=None):
    """The DPO trainer: LoRA from `peft_config`, reference = base with the adapter disabled.

    `model` is a loaded model, or (QLoRA) the path/id TRL loads in 4 bits itself.
    """
    import torch

    cfg = recipe.train
    device, dtype = _device_and_dtype(model)
    quant, init_kwargs = None, None
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16,
                                   bnb_4bit_use_double_quant=True)
        init_kwargs = {"dtype": torch.bfloat16, "revision": recipe.model.revision,
                       "device_map": {"": torch.cuda.current_device()}}
    args = dpo_config(cfg, Path(out_dir), device, dtype, init_kwargs)
    cls = trainer_class(cfg.engine)
    try:
        trainer = cls(model=model, ref_model=None, args=args, train_dataset=dataset,
                      eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks,
                      peft_config=lora_config(cfg), quantization_config=quant)
    except ValueError as e:  # peft's NoMatchingPeftModuleError: no module has those names
        if type(e).__name__ != "NoMatchingPeftModuleError":
            raise
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear)} - {"lm_head"}) \
            if isinstance(model, torch.nn.Module) else []
        raise PrefloopError(f"train.target_modules: '{cfg.target_modules}' matches no layer of "
                            "the model; use all-linear or some of its linear layers"
                            + (f" ({', '.join(have)})" if have else "")) from None
    quiet_stdout(trainer)
    return trainer


def quiet_stdout(trainer) -> None:
    """Keep the per-step log dicts off stdout. transformers adds PrinterCallback (`print(logs)`)
    when its tqdm is disabled, as the command line's verbosity makes it, else ProgressCallback
    (`tqdm.write(str(logs))`, also stdout): both go, and a bar on stderr takes their place. The
    numbers are in train/log.jsonl (make_log_callback)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in list(trainer.callback_handler.callbacks):
        # NotebookProgressCallback (Jupyter) is not a ProgressCallback subclass
        if isinstance(cb, (PrinterCallback, ProgressCallback)) or \
                type(cb).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(cb)
    trainer.add_callback(make_progress_callback())


def make_progress_callback():
    """A tqdm bar on stderr: one tick per optimizer step, the last logged loss beside it."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StderrProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc="train", unit="step",
                                file=sys.stderr, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and isinstance(logs.get("loss"), float):
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StderrProgress()


def close_progress(trainer) -> None:
    """Close the progress bar (make_progress_callback) of a trainer whose training stopped."""
    for cb in trainer.callback_handler.callbacks:
        if getattr(cb, "bar", None) is not None:
            cb.bar.close()
            cb.bar = None


def make_log_callback(path: Path):
    """A TrainerCallback appending one JSON line per logged training step (whole-line appends)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def __init__(self) -> None:
            self.records: list[dict] = []
            self.num_tokens: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "num_tokens" in logs:
                self.num_tokens = logs["num_tokens"]
            if not state.is_world_process_zero:
                return
            keys = LOG_KEYS if "loss" in logs else ("step", "epoch", *EVAL_KEYS) \
                if "eval_loss" in logs else None
            if keys is None:
                return
            rec = {k: logs.get(k) for k in keys}
            rec["step"] = state.global_step
            rec["epoch"] = logs.get("epoch", state.epoch)
            self.records.append(rec)
            append_jsonl(path, [rec])

    return JsonlLog()


# --- checkpoints -----------------------------------------------------------------------------

def make_checkpoint_callback():
    """Mark each checkpoint complete once transformers has written all of it (a kill during the
    save leaves an unmarked folder, which resume ignores)."""
    from transformers import TrainerCallback

    from prefloop.artifacts import test_point

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / CHECKPOINT_DONE).touch()
                test_point("train", "checkpoint")

    return MarkComplete()


def last_checkpoint(scratch: Path, *, clean: bool = False) -> Path | None:
    """The newest complete checkpoint folder under the trainer's output folder, if any;
    `clean` (main process) deletes the incomplete ones."""
    found = []
    for folder in Path(scratch).glob("checkpoint-*"):
        step = folder.name.rpartition("-")[2]
        if (folder / CHECKPOINT_DONE).is_file() and step.isdigit():
            found.append((int(step), folder))
        elif clean:
            shutil.rmtree(folder, ignore_errors=True)
    return max(found)[1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rpartition("-")[2])


def keep_log_until(path: Path, step: int) -> None:
    """Drop the log lines a killed run wrote after its last checkpoint (they will be redone)."""
    if path.exists():
        from prefloop.artifacts import write_jsonl

        write_jsonl(path, [r for r in read_jsonl(path, allow_partial_tail=True)
                           if r["step"] <= step])


def final_eval(trainer, eval_pairs, log: Path) -> dict | None:
    """The eval pairs scored by the trained adapter (logged as the last eval line); None
    without an eval split. Every process takes part; the main one writes the line."""
    if eval_pairs is None:
        return None
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    if last.get("step") != trainer.state.global_step:
        last = trainer.evaluate()  # the last step was not an eval step
    return {k: last.get(k) for k in EVAL_KEYS}


def remove_checkpoints(scratch: Path) -> None:
    """The finished stage needs no checkpoint: keep only what trackers wrote (runs/:
    tensorboard's event files), else remove the folder."""
    scratch = Path(scratch)
    if not (scratch / "runs").is_dir():
        shutil.rmtree(scratch, ignore_errors=True)
        return
    for entry in scratch.iterdir():
        if entry.name != "runs":
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


# --- checks and reports ----------------------------------------------------------------------

def sequence_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) over the completion tokens: shape () for one sequence."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, :-1].float()  # (L-1, V) predicts tokens 1..L-1
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt_ids) - 1:].sum()


def rendered_pair_ids(pair: dict, tokenizer) -> dict:
    """Token ids of a pair rendered with the chat template, as prefloop renders prompts."""
    from prefloop.chat import render_messages

    prompt = render_messages(tokenizer, pair["prompt"]).ids
    out = {"prompt_ids": prompt}
    for side in ("chosen", "rejected"):
        full = render_messages(tokenizer, pair["prompt"] + pair[side],
                               add_generation_prompt=False).ids
        out[f"{side}_ids"] = full[len(prompt):]
    return out


def first_pair_ids(prepared, pairs, tokenizer) -> dict:
    """Token ids of the first pair as the trainer sees them (TRL's prepared columns), or
    rendered with the chat template when a trainer keeps another layout."""
    row = prepared[0]
    if all(k in row for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
        return {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    return rendered_pair_ids(pairs[0], tokenizer)


def model_logps(model, ids: dict) -> list[float]:
    """[log π(chosen | prompt), log π(rejected | prompt)] of one pair under `model`."""
    import torch

    was_training = model.training
    model.eval()
    p = ids["prompt_ids"]
    with torch.no_grad():
        out = [sequence_logps(model, p, ids[f"{side}_ids"]).item()
               for side in ("chosen", "rejected")]
    model.train(was_training)
    return out


def trainer_reference_logps(trainer) -> list[float]:
    """The first pair's reference log-probs through the trainer's own reference path (TRL:
    `compute_ref_log_probs`, the adapter disabled), on the batch its collator builds."""
    import torch

    batch = trainer.data_collator([trainer.train_dataset[0]])
    device = trainer.accelerator.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    was_training = trainer.model.training
    trainer.model.eval()
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    trainer.model.train(was_training)
    return [chosen.sum().item(), rejected.sum().item()]


def reference_check(base: list[float] | None, reference: list[float], dtype: torch.dtype,
                    when: str) -> dict:
    """Does the trainer's reference score the first pair as the model loaded for this round
    (M_t, computed separately before any adapter existed)? It must, at step 0 and after
    training alike: a reference that moved with the policy, or another model, fails it."""
    import torch

    if base is None:
        return {f"reference_is_base_{when}": None, "reason": "QLoRA: the trainer loads the base"}
    tol = 1e-3 if dtype == torch.float32 else 2e-2  # relative, of |log p|
    ok = all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(reference, base, strict=True))
    return {f"reference_is_base_{when}": ok,
            f"reference_logps_{when}": [round(x, 4) for x in reference]}


def summarize(records: list[dict], n: int = LAST_N) -> tuple[dict, dict]:
    """(values at the last logged step, means over the last n logged steps) per training metric
    (evaluation lines aside)."""
    keys = [k for k in LOG_KEYS if k not in ("step", "epoch")]
    records = [r for r in records if "loss" in r]
    if not records:
        return {k: None for k in keys}, {k: None for k in keys}
    tail = records[-n:]
    mean = {k: (sum(r[k] for r in tail if r[k] is not None) /
                max(sum(r[k] is not None for r in tail), 1)) for k in keys}
    return {k: records[-1][k] for k in keys}, mean


def plot_curves(records: list[dict], path: Path) -> None:
    """Loss, reward margin, reward accuracy and chosen/rejected rewards against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(rows, key):
        return [r["step"] for r in rows], [math.nan if r.get(key) is None else r[key]
                                           for r in rows]

    train_rows = [r for r in records if "loss" in r]
    eval_rows = [r for r in records if "eval_loss" in r]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [("loss", ["loss"]), ("reward margin (chosen − rejected)", ["rewards/margins"]),
              ("reward accuracy", ["rewards/accuracies"]),
              ("rewards", ["rewards/chosen", "rewards/rejected"])]
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            label = key.split("/")[-1] if len(keys) > 1 else "train"
            ax.plot(*series(train_rows, key), marker="o", markersize=3,
                    label=f"{label} (train pairs)" if len(keys) > 1 and eval_rows else label)
            if eval_rows:
                ax.plot(*series(eval_rows, f"eval_{key}"), marker="s", markersize=4,
                        linestyle="--", label=f"{label} (eval pairs)" if len(keys) > 1 else "eval")
        for step in epoch_starts(train_rows):
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step (dotted: a new epoch begins)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1 or eval_rows:
            ax.legend(fontsize=8)
    axes[1, 0].set_ylim(-0.05, 1.05)
    fig.suptitle("prefloop DPO training")
    save_figure(fig, path)


def epoch_starts(records: list[dict]) -> list[float]:
    """Steps where training entered a new epoch: between the last logged step of epoch e and
    the first of e+1 (epochs as the trainer logs them, fractional)."""
    marks = []
    for prev, cur in zip(records, records[1:], strict=False):
        if prev.get("epoch") is not None and cur.get("epoch") is not None and \
                math.floor(cur["epoch"] - 1e-9) > math.floor(prev["epoch"] - 1e-9):
            marks.append((prev["step"] + cur["step"]) / 2)
    return marks


def hyper_parameters(cfg: TrainConfig, args, n_pairs: int, n_used: int, steps: int,
                     targets: list[str]) -> dict:
    return {
        "loss_type": cfg.loss_type, "beta": cfg.beta, "learning_rate": cfg.learning_rate,
        "epochs": cfg.epochs, "max_steps": cfg.max_steps, "optimizer steps (run)": steps,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "effective batch": cfg.batch_size * cfg.grad_accum * args.world_size,
        "warmup_ratio": cfg.warmup_ratio,
        "scheduler": cfg.scheduler, "max_length": cfg.max_length, "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": f"{cfg.target_modules} ({', '.join(targets)})",
        "gradient_checkpointing": cfg.gradient_checkpointing, "qlora": cfg.qlora,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": cfg.seed, "engine": cfg.engine, "pairs": n_pairs, "pairs trained": n_used,
    }


def lora_targets(model) -> tuple[list[str], int]:
    """(sorted distinct layer names that carry LoRA, e.g. q_proj; number of LoRA modules)."""
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    return sorted({n.rsplit(".", 1)[-1] for n in names}), len(names)


def full_state_dict(trainer) -> dict | None:
    """Under FSDP each process holds a slice of the weights: gather them (a collective, so every
    process must call it). None otherwise: the model in each process is whole."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model)
    return None


def check_fsdp() -> None:
    """FSDP2 only: FSDP1 trains a LoRA model but cannot gather it back into a PEFT adapter
    (its full state dict expects the frozen base weights beside the LoRA ones and fails)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise PrefloopError(f"accelerate config: fsdp_version {version} cannot save a LoRA "
                            "adapter; set fsdp_version: 2 (as configs/accelerate/fsdp.yaml does)")


def portable_adapter_config(folder: Path, recipe: Recipe) -> None:
    """adapter_config.json names the base model as another machine can resolve it (the Hub id
    of an embedded model's source, else the recipe's model name), not this machine's converted
    copy in the user cache; recipe.yaml beside it says which exact base prefloop trained on."""
    import json

    from prefloop.config import dump_recipe
    from prefloop.models import hub_base_id

    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = hub_base_id(recipe.model.name) or recipe.model.name
    if recipe.model.revision:
        data["revision"] = recipe.model.revision
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")


def _save_adapter(model, tokenizer, adapter_dir: Path, recipe: Recipe,
                  state_dict: dict | None = None) -> None:
    """Write the adapter and tokenizer to a temp folder, then move it into place whole."""
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is None:
        model.save_pretrained(str(tmp))
    else:  # gathered from FSDP shards; PEFT keeps only the adapter's entries
        model.save_pretrained(str(tmp), state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    portable_adapter_config(tmp, recipe)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp, adapter_dir)


# --- stage -----------------------------------------------------------------------------------

def _load_policy(recipe: Recipe):
    """(model or, for QLoRA, the path TRL loads in 4 bits; tokenizer)."""
    from prefloop.models import load_model, load_tokenizer, resolve_model

    if recipe.train.qlora:
        return resolve_model(recipe.model.name), load_tokenizer(recipe.model.name,
                                                                recipe.model.revision)
    return load_model(recipe.model)


# settings that change no weight of the adapter: a killed run may resume under other values
UNHASHED = ("report_to", "save_steps")


def stage_config(recipe: Recipe, upstream) -> dict:
    """What the stage's manifest hash covers (prefloop.plan predicts it before a run). The
    fast_* settings count only with the fast engine (so a trl run's hash is unchanged by them),
    the eval split only when there is one, and UNHASHED never."""
    cfg = recipe.train
    skip = set(UNHASHED) | (set() if cfg.engine == "fast" else set(fast_settings(cfg)))
    if cfg.eval_fraction == 0:  # no eval split: eval_steps is unused
        skip |= {"eval_fraction", "eval_steps"}
    hashed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return {"train": hashed, "model": recipe.model, "upstream": upstream("pairs")}


def run(recipe: Recipe, run_dir: Path, *, force: bool = False) -> Path:
    import torch

    from prefloop.models import dtype_record, pick_device

    cfg = recipe.train
    run = RunDir(run_dir)
    out = run.stage("train")
    distributed.topology()  # first: under a launcher it also picks this process's GPU
    up = Upstream(run)  # the stages read: their finish ids go in the manifest
    stage = Stage(out, "train", stage_config(recipe, up), inputs=up.folders)
    device = pick_device(recipe.model.device)
    check_options(cfg, device)
    check_fsdp()

    def restart() -> None:  # resume from the last complete checkpoint, else restart at step 1
        run.curves.unlink(missing_ok=True)
        shutil.rmtree(run.adapter, ignore_errors=True)
        resume = last_checkpoint(run.trainer_scratch, clean=True) if cfg.save_steps else None
        if resume is None:
            run.train_log.unlink(missing_ok=True)
            shutil.rmtree(run.trainer_scratch, ignore_errors=True)
        else:
            keep_log_until(run.train_log, checkpoint_step(resume))

    # Only the main process deletes or writes files; the others train and wait (DDP/FSDP).
    if stage.begin(force=force, restart=restart):
        return out
    topo = distributed.topology()
    pairs, eval_pairs = split_pairs(load_pairs(run_dir), cfg)
    model, tok = _load_policy(recipe)
    # The base (M_t) scores the first pair before any adapter exists: the reference must match.
    first = rendered_pair_ids(pairs[0], tok)
    base = None if isinstance(model, str) else model_logps(model, first)
    dtype = torch.bfloat16 if isinstance(model, str) else next(model.parameters()).dtype
    log_cb = make_log_callback(run.train_log)
    trainer = build_trainer(model, tok, pairs, recipe, run.trainer_scratch,
                            [log_cb, make_checkpoint_callback()], eval_dataset=eval_pairs)
    n_used = len(trainer.train_dataset)
    if n_used == 0:
        raise PrefloopError(f"train.max_length: every pair's prompt is at least {cfg.max_length} "
                            "tokens, so TRL dropped them all; raise train.max_length")
    same_tokens = first_pair_ids(trainer.train_dataset, pairs, tok) == first
    check = {"base_logps": base, "same_tokens": same_tokens,
             **reference_check(base if same_tokens else None, trainer_reference_logps(trainer),
                               dtype, "step0")}
    if check["reference_is_base_step0"] is False:
        print(f"[prefloop] warning: the DPO reference is not the loaded model at step 0 "
              f"({check}); the rewards are offset", file=sys.stderr)

    resume = last_checkpoint(run.trainer_scratch) if cfg.save_steps else None
    if resume is not None:
        print(f"[prefloop] train: resuming from {resume} (step {checkpoint_step(resume)})",
              file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        evaluation = final_eval(trainer, eval_pairs, run.train_log)
    finally:  # an interrupt or error: end the bar's line, so the message starts on its own
        close_progress(trainer)
    seconds = time.time() - t0
    steps = trainer.state.global_step
    check.update(reference_check(base if same_tokens else None,
                                 trainer_reference_logps(trainer), dtype, "end"))
    state_dict = full_state_dict(trainer)  # every process, before the main-only part
    if not topo.is_main:
        distributed.barrier()  # wait for the main process to write the adapter and manifest
        return out
    policy = trainer.accelerator.unwrap_model(trainer.model)
    records = read_jsonl(run.train_log) if run.train_log.exists() else []
    if records:
        check["first_logged_step"] = {k: records[0][k] for k in
                                      ("step", "rewards/chosen", "rewards/rejected")}
    tokens = log_cb.num_tokens
    timing = {"train_seconds": round(seconds, 3), "steps": steps,
              "seconds_per_step": round(seconds / max(steps, 1), 3),
              "tokens": tokens,
              # resumed: the token count spans both runs, the seconds only this one
              "tokens_per_second": round(tokens / seconds, 1) if tokens and not resume else None,
              "pairs_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 3),
              "device": str(device)}

    _save_adapter(policy, tok, run.adapter, recipe, state_dict)
    print(f"[prefloop] train: adapter saved to {run.adapter} ({trainer.args.world_size} "
          "process(es))", file=sys.stderr, flush=True)
    plot_curves(records, run.curves)
    targets, n_lora = lora_targets(policy)
    final, mean_last = summarize(records)
    hyper = hyper_parameters(cfg, trainer.args, len(pairs), n_used, steps, targets)
    hyper["eval pairs (held out of training)"] = len(eval_pairs) if eval_pairs is not None else 0
    from prefloop.cards import adapter_card

    atomic_write_text(run.adapter / "README.md", adapter_card(
        recipe, run_dir, hyper=hyper, final=final, last_n=min(LAST_N, len(records)),
        mean_last=mean_last, dataset_repo_id=run.pushed_dataset_id(), timing=timing,
        evaluation=evaluation))
    remove_checkpoints(run.trainer_scratch)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return stage.finish({
        "pairs": len(pairs) + (len(eval_pairs) if eval_pairs is not None else 0),
        "pairs_trained": n_used, "eval_pairs": len(eval_pairs) if eval_pairs is not None else 0,
        "steps": steps, "log_lines": len(records)},
        extra={"eval": evaluation,
               "resumed_from_step": checkpoint_step(resume) if resume else None,
               "step0_check": check, "timing": timing, "final": final, "mean_last": mean_last,
               "lora": {"targets": targets, "modules": n_lora,
                        "trainable_params": trainable},
               "reference": "base model with the LoRA adapter disabled (no second copy)",
               "processes": trainer.args.world_size, **dtype_record(recipe.model)})
