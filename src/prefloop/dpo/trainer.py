"""FastDPOTrainer: TRL's `DPOTrainer`, each batch computed as packed pairs in memory-bounded chunks.

It keeps TRL's dataset preparation, truncation rule, fused LM head, reference handling, optimizer
loop and metric names, and changes only how a batch is computed:

* The reference log-probs come from one no-grad forward over the packed batch (adapters off, or
  precomputed by TRL's ``precompute_ref_log_probs``).
* The policy then runs in chunks of pairs (at least ``fast_min_chunk_tokens`` tokens: smaller chunks
  leave a 7B GPU waiting on Python), each forward and backward at once, and a chunk checkpoints only
  as many decoder layers as its activation budget requires: by default the activation memory TRL's
  own layout needs for this batch size and the data's longest sequence, measured once on the model.
* Summing per-chunk losses scaled by ``|chunk| / B`` gives TRL's loss and gradient (`loss.py`).

Configurations outside that (``aot`` losses, WPO weighting, LD-DPO, f-divergences, MoE aux loss,
vision data, ``keep_end`` truncation, sliding-window or soft-capped attention, prompt-learning PEFT,
a custom collator) fall back to TRL's own computation; `fast_fallback_reason` says why.

TRL's and transformers' private attributes are touched in `TRLInternals` only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import DPOConfig, DPOTrainer

from prefloop.dpo.attention import ATTN_NAME, PACK_KWARG
from prefloop.dpo.loss import SUPPORTED_LOSSES, pair_losses, sft_loss
from prefloop.dpo.memory import ActivationCost, kept_layers, lean_modules
from prefloop.dpo.pack import (
    Pair,
    PairCollator,
    PairPack,
    pack_pairs,
    packed_length,
    plan_chunks,
    truncate_pair,
)

logger = logging.getLogger(__name__)


@dataclass
class FastDPOConfig(DPOConfig):
    """`DPOConfig` plus the fast engine's knobs (a plain `DPOConfig` gets these defaults)."""

    fast_activation_budget_gb: float | None = field(
        default=None,
        metadata={"help": "Activation memory a batch chunk may hold, in GiB. None: what TRL's "
                  "padded layout would need for this batch size and the data's longest sequence."},
    )
    fast_min_chunk_tokens: int = field(
        default=8192,
        metadata={"help": "Smallest chunk worth a forward/backward of its own: below a few thousand "
                  "tokens a 7B step is bound by Python and kernel launches, so pairs are grouped up to "
                  "this size even if more layers must then be checkpointed (within the budget)."},
    )
    fast_lean_activations: bool = field(
        default=True,
        metadata={"help": "Save less for the backward of RMSNorm and SwiGLU (Llama, Mistral, Qwen2/3 "
                  "modules): the input and 1/rms instead of fp32 copies; gate and up, not silu(gate)."},
    )


class TRLInternals:
    """The one place where prefloop touches private names of TRL (1.16) and transformers (5.x).

    When a TRL or transformers upgrade breaks FastDPOTrainer, fix it here: nothing else in
    prefloop.dpo reads or writes their private attributes or imports from their internal modules.
    It wraps any `trl.DPOTrainer`, TRL's own included (bench/dpo_7b.py reads TRL's metrics with it).
    """

    def __init__(self, trainer: DPOTrainer) -> None:
        self.trainer = trainer

    @property
    def tokenizer(self):
        """The tokenizer (the processing class, or its ``.tokenizer`` for a processor)."""
        return self.trainer._tokenizer

    def metrics(self, mode: str) -> dict[str, list[float]]:
        """TRL's per-step metric lists for "train" or "eval", which its `log` averages."""
        return self.trainer._metrics[mode]

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """transformers' `Trainer._prepare_inputs`: a batch's tensors to the trainer's device."""
        return self.trainer._prepare_inputs(inputs)

    def count_train_tokens(self, tokens: int) -> None:
        """Add a batch's tokens to TRL's ``num_tokens`` counter, as TRL does."""
        self.trainer._total_train_tokens += tokens // self.trainer._tp_size

    @property
    def train_tokens(self) -> int:
        """TRL's ``num_tokens`` counter: training tokens seen so far."""
        return self.trainer._total_train_tokens

    @staticmethod
    def padded_collator(**kwargs: Any):
        """TRL's own collator (2B right-padded rows), for the batches the fast path leaves to TRL."""
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        return DataCollatorForPreference(**kwargs)

    @staticmethod
    def use_adapter(model, adapter_name: str | None):
        """TRL's context manager that runs a PEFT model with adapter_name (None: adapters off)."""
        from trl.trainer.utils import use_adapter

        return use_adapter(model, adapter_name=adapter_name)

    @staticmethod
    def attn_implementation(config) -> str | None:
        """The attention implementation a transformers model config routes to."""
        return config._attn_implementation

    @staticmethod
    def set_attn_implementation(config, name: str | None) -> None:
        """Route the model's attention to the registered implementation name (no checks)."""
        config._attn_implementation = name


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """A small index tensor on device, copied from pinned memory so the CPU need not wait."""
    index = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def _is_pair_batch(inputs: dict[str, Any]) -> bool:
    return "pair_lengths" in inputs and "prompt_ids" in inputs


@dataclass
class _StepStats:
    """Per-pair and per-token sums of one batch, gathered over its chunks."""

    chosen_logps: list[torch.Tensor] = field(default_factory=list)
    rejected_logps: list[torch.Tensor] = field(default_factory=list)
    ref_chosen: list[torch.Tensor] = field(default_factory=list)
    ref_rejected: list[torch.Tensor] = field(default_factory=list)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + value.detach().float()


class FastDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` with the same constructor and metrics, computing batches as packed pairs.

    See the module docstring. `args` may be a `DPOConfig` or a `FastDPOConfig`.
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None):
        reason = self._args_unsupported(args, data_collator, train_dataset)
        if reason is None and not isinstance(model, str):
            reason = self._model_unsupported(model, peft_config)
        self.fast_fallback_reason = reason
        if reason is None:
            data_collator = PairCollator()
        self._cost: ActivationCost | None = None
        self._layers: list[GradientCheckpointingLayer] | None = None
        self.last_plan: list[tuple[int, int]] = []
        self._data_max_len: int | None = None
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        if self.fast_fallback_reason is None:
            self.fast_fallback_reason = self._model_unsupported(self.model, None)
        if self.fast_fallback_reason is not None:
            logger.warning(f"FastDPOTrainer: {self.fast_fallback_reason}; using TRL's computation")

    # ---- what the fast path covers

    @staticmethod
    def _args_unsupported(args, data_collator, train_dataset) -> str | None:
        if args is None:
            return None
        if data_collator is not None:
            return "a custom data_collator was given"
        unsupported = set(args.loss_type) - SUPPORTED_LOSSES
        if unsupported:
            return f"loss_type {sorted(unsupported)} is not a per-pair loss"
        if args.ld_alpha is not None or args.use_weighting or args.f_divergence_type != "reverse_kl":
            return "ld_alpha, use_weighting and f-divergences are computed by TRL only"
        if args.max_length is not None and args.truncation_mode != "keep_start":
            return "truncation_mode 'keep_end' cuts prompts differently for chosen and rejected"
        if train_dataset is not None:
            first = next(iter(train_dataset))
            if "image" in first or "images" in first:
                return "vision datasets are computed by TRL only"
        return None

    @staticmethod
    def _model_unsupported(model, peft_config) -> str | None:
        text = model.config.get_text_config()
        window = getattr(text, "sliding_window", None)
        if window is not None and getattr(text, "use_sliding_window", True):
            return "sliding-window attention"
        if getattr(text, "attn_logit_softcapping", None) is not None:
            return "soft-capped attention logits"
        if getattr(text, "output_router_logits", False):
            return "MoE router auxiliary loss"
        configs = [peft_config] if peft_config is not None else []
        if is_peft_model(model):
            configs += list(model.peft_config.values())
        if any(getattr(c, "is_prompt_learning", False) for c in configs):
            return "prompt-learning PEFT adds virtual tokens"
        return None

    @property
    def fast(self) -> bool:
        return self.fast_fallback_reason is None

    @property
    def activation_cost(self) -> ActivationCost | None:
        """Saved-activation bytes per token, measured at the first training step (None before)."""
        return self._cost

    def activation_budget(self, batch_size: int) -> float | None:
        """Activation bytes a chunk may hold in a batch of batch_size pairs (None before the first
        training step; see FastDPOConfig.fast_activation_budget_gb)."""
        return None if self._cost is None else self._budget(self._cost, batch_size)

    @property
    def _trl(self) -> TRLInternals:
        return TRLInternals(self)

    # ---- overrides

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.fast or not _is_pair_batch(inputs):
            return super().training_step(model, self._as_trl_batch(inputs), num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._trl.prepare_inputs(inputs)
        with self.maybe_activation_offload_context:
            return self._fast_batch(model, inputs, backward=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fast and _is_pair_batch(inputs) and not return_outputs:
            return self._fast_batch(model, inputs, backward=False)
        return super().compute_loss(model, self._as_trl_batch(inputs), return_outputs,
                                    num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        if not (self.fast and _is_pair_batch(inputs)):
            return super().compute_ref_log_probs(model, self._as_trl_batch(inputs))
        with self._packed_forward_context():
            return self._reference_for_pairs(self._pairs(inputs), model)

    def _reference_for_pairs(self, pairs: list[Pair], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (B,), (B,) of the pairs, in as few no-grad forwards as TRL's batch."""
        chosen, rejected = [], []
        for chunk in plan_chunks([packed_length(p) for p in pairs], self._ref_chunk_tokens()):
            pack = pack_pairs([pairs[i] for i in chunk]).to(self.accelerator.device)
            c, r = self._reference_logps(pack, model)
            chosen.append((chunk, c))
            rejected.append((chunk, r))
        return self._unchunk(chosen, len(pairs)), self._unchunk(rejected, len(pairs))

    # ---- batch conversion

    def _pairs(self, inputs: dict[str, Any]) -> list[Pair]:
        return [truncate_pair(p, c, r, self.args.max_length) for p, c, r in
                zip(inputs["prompt_ids"], inputs["chosen_ids"], inputs["rejected_ids"], strict=True)]

    def _as_trl_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """TRL's padded layout of a pair batch, for the computations the fast path leaves to TRL."""
        if not _is_pair_batch(inputs):
            return inputs
        keys = [k for k in ("ref_chosen_logps", "ref_rejected_logps") if k in inputs]
        examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r,
                     **{k: inputs[k][i].item() for k in keys}}
                    for i, (p, c, r) in enumerate(zip(inputs["prompt_ids"], inputs["chosen_ids"],
                                                      inputs["rejected_ids"], strict=True))]
        collator = TRLInternals.padded_collator(
            pad_token_id=self._trl.tokenizer.pad_token_id, max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode, pad_to_multiple_of=self.args.pad_to_multiple_of)
        return self._trl.prepare_inputs(collator(examples))

    @staticmethod
    def _unchunk(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
        out = torch.empty(n, device=parts[0][1].device, dtype=parts[0][1].dtype)
        for idx, values in parts:
            out[_index(idx, out.device)] = values
        return out

    # ---- the packed forward

    def _all_models(self) -> list[torch.nn.Module]:
        models = [self.accelerator.unwrap_model(self.model)]
        if self.ref_model is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        return models

    @contextlib.contextmanager
    def _packed_forward_context(self, lean: bool | None = None) -> Iterator[None]:
        """Route attention to `pair_attention`; with lean activations, also use the lean RMSNorm and
        MLP forwards and, under autocast, skip PEFT's fp32 copies of LoRA inputs.

        It must cover the backward too: checkpointed layers run their forward again there.
        """
        if lean is None:
            lean = getattr(self.args, "fast_lean_activations", True)
        configs = [m.config.get_text_config() for m in self._all_models()]
        saved_attn = [TRLInternals.attn_implementation(c) for c in configs]
        tuners, patched = [], []
        if lean:
            patched = [item for m in self._all_models() for item in lean_modules(m)]
            if self.accelerator.mixed_precision in ("bf16", "fp16"):
                tuners = [m for m in self._all_models()[0].modules()
                          if hasattr(m, "cast_input_dtype_enabled")]
        saved_cast = [m.cast_input_dtype_enabled for m in tuners]
        saved_forward = [module.__dict__.get("forward") for module, _ in patched]
        try:
            for c in configs:
                TRLInternals.set_attn_implementation(c, ATTN_NAME)
            for m in tuners:
                m.cast_input_dtype_enabled = False
            for module, forward in patched:
                module.forward = forward
            yield
        finally:
            for c, name in zip(configs, saved_attn, strict=True):
                TRLInternals.set_attn_implementation(c, name)
            for m, value in zip(tuners, saved_cast, strict=True):
                m.cast_input_dtype_enabled = value
            for (module, _), previous in zip(patched, saved_forward, strict=True):
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    def _run(self, model, pack: PairPack):
        # Autocast here, not only in accelerate's forward wrapper: `_packed_forward_context` turns
        # PEFT's input casting off, which is only exact when autocast casts the inputs instead.
        with self.accelerator.autocast():
            return model(input_ids=pack.input_ids, position_ids=pack.position_ids,
                         shift_labels=pack.shift_labels, fused_lm_head=True, use_cache=False,
                         **{PACK_KWARG: pack})

    @staticmethod
    def _side_sums(values: torch.Tensor, pack: PairPack) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum a per-position tensor (1, T) over each pair's chosen and rejected labels: (B,), (B,)."""
        n = pack.n_pairs
        bins = torch.where(pack.label_side > 0, pack.pair_id * 2 + pack.label_side - 1, 2 * n)
        # A one-hot product rather than index_add: CUDA's index_add sums in a varying order.
        sums = F.one_hot(bins, 2 * n + 1).to(values.dtype).T @ values[0]
        return sums[0:2 * n:2], sums[1:2 * n:2]

    def _reference_logps(self, pack: PairPack, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (B,), (B,): the reference model, or the policy with adapters off."""
        self._set_checkpointed_layers(0)
        adapter = contextlib.nullcontext()
        target = self.ref_model
        if target is None:
            target = model if model is not None else self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            if is_peft_model(unwrapped):
                name = "ref" if "ref" in unwrapped.peft_config else None
                adapter = TRLInternals.use_adapter(unwrapped, name)
        with torch.no_grad(), adapter:
            log_probs = self._run(target, pack).log_probs
        return self._side_sums(log_probs.float(), pack)

    # ---- memory

    def _gc_layers(self) -> list[GradientCheckpointingLayer]:
        if self._layers is None:
            self._layers = [m for m in self.accelerator.unwrap_model(self.model).modules()
                            if isinstance(m, GradientCheckpointingLayer)]
        return self._layers

    def _set_checkpointed_layers(self, n: int) -> None:
        """Checkpoint the first n decoder layers only (all of them when n >= L)."""
        if not self.args.gradient_checkpointing:
            return
        for i, layer in enumerate(self._gc_layers()):
            layer.gradient_checkpointing = i < n

    def _activation_cost(self, model) -> ActivationCost:
        """Measure saved-activation bytes per token once, on a dummy pair, no layer checkpointed.

        Measured twice: as this trainer runs the model, and without the lean activations (what TRL's
        own run saves per layer, which sets the default budget).
        """
        if self._cost is not None:
            return self._cost
        unwrapped = self.accelerator.unwrap_model(self.model)
        frozen = {t.untyped_storage().data_ptr() for t in
                  list(unwrapped.parameters()) + list(unwrapped.buffers())}
        token = self._trl.tokenizer.eos_token_id or 0
        pack = pack_pairs([([token] * 128, [token] * 192, [token] * 192)]).to(self.accelerator.device)

        def saved_per_token(lean: bool) -> float:
            seen: dict[int, int] = {}

            alive: list[torch.Tensor] = []

            def keep(t: torch.Tensor) -> None:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in frozen:
                    seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
                # Hold the tensor here, not in the graph: returned to autograd it could keep its own
                # graph alive (a cycle Python's collector cannot see); dropped at once, its memory
                # would be reused and two tensors would share an address.
                alive.append(t)

            def no_backward(_: None) -> torch.Tensor:
                raise RuntimeError("the activation probe's graph has no backward")

            with self._packed_forward_context(lean=lean), \
                    torch.autograd.graph.saved_tensors_hooks(keep, no_backward), \
                    self.compute_loss_context_manager():
                out = self._run(model, pack)
            del out
            alive.clear()
            return sum(seen.values()) / pack.n_tokens

        self._set_checkpointed_layers(0)
        lean = getattr(self.args, "fast_lean_activations", True)
        full = saved_per_token(lean)
        reference = saved_per_token(False) if lean else full
        n_layers = max(len(self._gc_layers()), 1)
        kept = unwrapped.get_input_embeddings().weight.element_size() * \
            unwrapped.config.get_text_config().hidden_size
        self._cost = ActivationCost(full=full, layer=full / n_layers, kept=float(kept),
                                    n_layers=n_layers, reference_full=reference)
        return self._cost

    def _budget(self, cost: ActivationCost, batch_size: int) -> float:
        """Activation bytes a chunk may hold (see FastDPOConfig.fast_activation_budget_gb)."""
        gb = getattr(self.args, "fast_activation_budget_gb", None)
        if gb is not None:
            return gb * 2**30
        # TRL's layout: 2B rows of the longest sequence, checkpointed or not as the config says.
        rows = 2 * batch_size * self._longest_sequence()
        if self.args.gradient_checkpointing:
            return rows * (cost.n_layers * cost.kept + cost.reference_layer)
        return rows * (cost.reference_full or cost.full)

    def _longest_sequence(self) -> int:
        """The longest prompt + completion TRL would pad to in this dataset (after truncation)."""
        if self._data_max_len is None:
            cap = self.args.max_length
            try:
                columns = self.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
                longest = max(len(p) + max(len(c), len(r)) for p, c, r in
                              zip(columns["prompt_ids"], columns["chosen_ids"],
                                  columns["rejected_ids"], strict=True))
                self._data_max_len = min(longest, cap) if cap else longest
            except (AttributeError, TypeError, ValueError):  # streaming data: use the cap
                self._data_max_len = cap or 4096
        return self._data_max_len

    def _chunk_tokens(self, cost: ActivationCost, budget: float) -> int:
        """Largest chunk to plan for: no checkpointing if that allows fast_min_chunk_tokens, else
        fast_min_chunk_tokens as long as the budget holds it with every layer checkpointed."""
        no_checkpointing = int(budget // (cost.full + cost.layer))
        all_checkpointed = int(budget // (cost.n_layers * cost.kept + cost.layer))
        wanted = getattr(self.args, "fast_min_chunk_tokens", FastDPOConfig.fast_min_chunk_tokens)
        return max(no_checkpointing, min(wanted, all_checkpointed), 1)

    def _ref_chunk_tokens(self) -> int:
        """Tokens per no-grad reference forward: as many as TRL's padded batch would hold."""
        batch = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        return 2 * batch * (self.args.max_length or 2048)

    # ---- one batch

    def _fast_batch(self, model, inputs: dict[str, Any], backward: bool) -> torch.Tensor:
        """Loss of one batch, chunk by chunk; with backward=True each chunk's gradient is added."""
        mode = "train" if self.model.training else "eval"
        pairs = self._pairs(inputs)
        n_pairs = len(pairs)
        lengths = [packed_length(p) for p in pairs]
        # The "sft" term is a mean over all chosen tokens of the batch: fix its denominator now.
        n_chosen_total = max(sum(len(c) for _, c, _ in pairs), 1)
        precomputed = self.precompute_ref_logps
        device = self.accelerator.device
        stats = _StepStats()
        plan: list[tuple[int, int]] = []
        total = torch.zeros((), device=device)
        if backward:
            self._activation_cost(model)
        with self._packed_forward_context():
            if precomputed:
                ref_chosen = inputs["ref_chosen_logps"].to(device).float()
                ref_rejected = inputs["ref_rejected_logps"].to(device).float()
            else:  # before the policy chunks, so its transient memory never meets their activations
                ref_chosen, ref_rejected = self._reference_for_pairs(pairs)
            if backward:
                cost = self._activation_cost(model)
                budget = self._budget(cost, n_pairs)
                chunks = plan_chunks(lengths, self._chunk_tokens(cost, budget))
            else:
                cost, budget = None, 0.0
                chunks = plan_chunks(lengths, self._ref_chunk_tokens())
            for i, chunk in enumerate(chunks):
                pack = pack_pairs([pairs[j] for j in chunk]).to(device)
                index = _index(chunk, device)
                ref_c, ref_r = ref_chosen[index], ref_rejected[index]
                if backward:
                    n_checkpointed = cost.n_layers - kept_layers(pack.n_tokens, budget, cost)
                    self._set_checkpointed_layers(n_checkpointed)
                    plan.append((pack.n_tokens, n_checkpointed))
                # Several GPUs: gradients are all-reduced once, after the batch's last chunk.
                last = i == len(chunks) - 1
                sync = contextlib.nullcontext() if last or not backward else self.accelerator.no_sync(model)
                with sync:
                    with self.compute_loss_context_manager():
                        loss = self._chunk_loss(model, pack, ref_c, ref_r, n_pairs, n_chosen_total,
                                                stats)
                    if backward:
                        loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
                        self.accelerator.backward(loss)
                total = total + loss.detach()
        self._set_checkpointed_layers(10**9)
        if backward:
            self.last_plan = plan  # (tokens, checkpointed layers) per chunk, for inspection
        self._log_batch(stats, pairs, mode)
        return total

    def _chunk_loss(self, model, pack: PairPack, ref_c: torch.Tensor, ref_r: torch.Tensor,
                    n_pairs: int, n_chosen_total: int, stats: _StepStats) -> torch.Tensor:
        """This chunk's share of the batch loss: Σ_types w · Σ_{pairs in chunk} ℓ / B."""
        out = self._run(model, pack)
        chosen, rejected = self._side_sums(out.log_probs.float(), pack)
        chosen_ratio, rejected_ratio = chosen - ref_c, rejected - ref_r
        loss = torch.zeros((), device=chosen.device)
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                term = sft_loss(chosen, n_chosen_total)
            else:
                term = pair_losses(loss_type, self.beta, chosen_ratio, rejected_ratio,
                                   pack.n_chosen, pack.n_rejected, self.label_smoothing,
                                   self.args.discopop_tau).sum() / n_pairs
            loss = loss + weight * term
        stats.chosen_logps.append(chosen.detach())
        stats.rejected_logps.append(rejected.detach())
        stats.ref_chosen.append(ref_c.detach())
        stats.ref_rejected.append(ref_r.detach())
        scored = pack.label_side > 0
        is_chosen = (pack.label_side == 1).float()
        is_rejected = (pack.label_side == 2).float()
        stats.add("entropy", (out.entropy[0].detach() * scored).sum())
        stats.add("scored", scored.sum())
        stats.add("chosen_tokens", is_chosen.sum())
        stats.add("rejected_tokens", is_rejected.sum())
        stats.add("chosen_logits", (out.mean_logits[0] * is_chosen).sum())
        stats.add("rejected_logits", (out.mean_logits[0] * is_rejected).sum())
        stats.add("chosen_top1", (out.is_top1[0].float() * is_chosen).sum())
        return loss

    def _log_batch(self, stats: _StepStats, pairs: list[Pair], mode: str) -> None:
        """TRL's metrics, under TRL's names, from the batch's per-pair sums."""
        gather = self.accelerator.gather_for_metrics
        trl = self._trl
        metrics = trl.metrics(mode)
        sums = {k: gather(v).sum().item() for k, v in stats.sums.items()}
        metrics["entropy"].append(sums["entropy"] / sums["scored"] if sums["scored"] else 0.0)
        if mode == "train":
            # As TRL counts them: both rows of a pair, the prompt twice.
            seen = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
            tokens = gather(torch.tensor(seen, device=self.accelerator.device)).sum().item()
            trl.count_train_tokens(tokens)
        metrics["num_tokens"] = [trl.train_tokens]
        for side in ("chosen", "rejected"):
            count = sums[f"{side}_tokens"]
            metrics[f"logits/{side}"].append(sums[f"{side}_logits"] / count if count else 0.0)
        chosen_count = sums["chosen_tokens"]
        metrics["mean_token_accuracy"].append(sums["chosen_top1"] / chosen_count if chosen_count else 0.0)
        chosen = torch.cat(stats.chosen_logps)
        rejected = torch.cat(stats.rejected_logps)
        chosen_rewards = self.beta * (chosen - torch.cat(stats.ref_chosen))
        rejected_rewards = self.beta * (rejected - torch.cat(stats.ref_rejected))
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        margins = chosen_rewards - rejected_rewards
        metrics["rewards/margins"].append(self.accelerator.gather(margins).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected).mean().item())
