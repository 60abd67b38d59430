"""Self-rewarding iterative DPO (Yuan et al. 2024, arXiv:2401.10020): M_t builds its own pairs.

Starting from M1 = model.name, for t = 1..T (iterate.rounds), in run_dir/rounds/<t>/ (a run
directory of its own, driven by the ordinary stage functions and a per-round recipe):

    X_t        = new prompts: Self-Instruct by a FIXED model (selfinstruct.py), or seed prompts
    y_x^1..N   ~ M_t(· | x),  x ∈ X_t                          N = 4, T 0.7, top-p 0.9
    r(x, y)    = (1/|V|) Σ_{v∈V} v, V = M_t's parsable self-judgments (3 samples, Fig. 2 prompt)
    (y_w, y_l) = (argmax_y r, argmin_y r), prompts whose scores all tie are dropped
    M_{t+1}    = argmin_θ  −E log σ(β [log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x)]),
                 with πθ initialised from M_t and π_ref = M_t,  β = 0.1

Reference model with LoRA: design A, "merge, then a fresh adapter" (docs/self_rewarding.md §7.2).
After round t the LoRA adapter is merged into M_t's weights and saved as a plain model folder,
rounds/<t>/model = M_{t+1}. Round t+1 trains a *new* adapter on that folder through the very same
`train.run` as `prefloop run`: TRL's reference is the adapter-disabled model, which is then
exactly M_{t+1}, and at step 0 policy = reference (LoRA B = 0). Why A rather than B (keep the
adapter; TRL adds a frozen "ref" copy of it):
- one reference mechanism for single runs and rounds, the one `train.run` already checks at
  step 0; B depends on TRL's "ref"-copy path, which has changed across versions and silently
  falls back to the base model for some LoRA kinds (huggingface/trl#6043);
- each round gets a fresh rank-r adapter instead of squeezing every round into one;
- every M_t is a standalone safetensors folder that generation, the self-judge, evaluation and
  other tools load without PEFT.
The cost is a full copy of the weights per round (0.5 GB for the 135M default in fp32), and in
bf16 the merged weights are rounded once. tests/test_iterate.py checks that round 2's reference
log-probs equal the merged M2's and differ from M1's.

Evaluation: rounds/0/eval holds M1's greedy responses to the fixed held-out prompts
(instructions/heldout.jsonl, never trained on), rounds/<t>/eval those of M_{t+1}, all scored by
a FIXED judge (`rank.make_ranker` on the recipe: the starting model, or rank.judge_model, or
PairRM), never by the model being trained. Win rate of a vs b over prompts where both were scored:

    w = (W + T/2) / (W + T + L),  W, T, L = #prompts with margin(a, b) > 0, = 0, < 0

margin = score(a) − score(b) for the pointwise judge (each response judged on its own, so order
cannot matter), PairRM's logit(a, b) − logit(b, a) (both orders) when pairwise.

Resume: every step is a stage folder with a manifest (config hash chained to the step before);
generation and judging append as they go, so a killed `prefloop iterate` resumes at the last
finished step and nothing saved is computed twice.
"""

from __future__ import annotations

import gc
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from prefloop.artifacts import (
    RunDir,
    Stage,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    hashable,
    read_jsonl,
    read_manifest,
    transaction,
    write_jsonl,
)
from prefloop.config import Recipe, dump_recipe, redacted
from prefloop.constraints.evaluate import compare_reports, reports, side_summary
from prefloop.errors import PrefloopError
from prefloop.rankers import make_ranker, ranker_class, self_judging
from prefloop.stages import generate, instructions, pairs, rank, selfinstruct, train
from prefloop.stages.compare import transfer_reading, win_rate
from prefloop.stages.report import label, round_row, summary_table, write_report
from prefloop.summary import stage_line


def model_name(recipe: Recipe, run_dir: Path, t: int) -> str:
    """M_{t+1}: the starting model for t = 0, else the merged folder rounds/<t>/model."""
    if t == 0:
        return recipe.model.name
    return str(RunDir(run_dir).round(t).merged_model.resolve())


# -- recipes ---------------------------------------------------------------------------------------


def seed_recipe(recipe: Recipe) -> Recipe:
    """The run-level instructions: the seed pool (train) and the fixed eval set (held-out)."""
    return replace(recipe, instructions=replace(recipe.instructions,
                                                n_heldout=recipe.iterate.eval_prompts))


def round_recipe(recipe: Recipe, run_dir: Path, t: int) -> Recipe:
    """Round t's recipe: M_t generates N candidates and judges them itself (the paper), or,
    when the recipe's ranker is programmatic (rank.ranker=constraints), that ranker scores
    them: iterative DPO with a fixed, verifiable reward."""
    it = recipe.iterate
    model = replace(recipe.model, name=model_name(recipe, run_dir, t - 1),
                    revision=recipe.model.revision if t == 1 else None)
    gen = replace(recipe.generate, k=it.n_candidates, temperature=it.temperature,
                  top_p=it.top_p, max_new_tokens=it.max_new_tokens, seed=it.seed + t)
    rank = recipe.rank if ranker_class(recipe.rank.ranker).programmatic else self_judging(
        recipe.rank, it.judge_samples)
    return replace(recipe, name=f"{recipe.name}-round{t}", model=model, generate=gen, rank=rank)


def check_recipe(recipe: Recipe) -> None:
    """Fail on settings that cannot work before any model loads."""
    it = recipe.iterate
    if recipe.model.backend != "local":  # a server holds one fixed model, not each round's M_t
        raise PrefloopError(f"model.backend: iterate needs the local engine (each round merges "
                            f"a new model), got '{recipe.model.backend}'; set model.backend=local")
    if it.prompt_source == "seed" and recipe.instructions.n_train < it.rounds * it.prompts_per_round:
        raise PrefloopError(
            f"instructions.n_train: {recipe.instructions.n_train} seed prompts cannot give "
            f"{it.rounds} disjoint rounds of iterate.prompts_per_round {it.prompts_per_round}; "
            f"raise instructions.n_train to {it.rounds * it.prompts_per_round}")
    if it.fewshot_seed < 1:
        raise PrefloopError("iterate.fewshot_seed: must be >= 1 (the paper uses 6)")
    if it.fewshot_generated < 0:
        raise PrefloopError("iterate.fewshot_generated: must be >= 0 (the paper uses 2)")
    if not 0 < it.rouge_threshold <= 1:
        raise PrefloopError(f"iterate.rouge_threshold: must be in (0, 1], got {it.rouge_threshold}")
    if it.min_words > it.max_words:
        raise PrefloopError(f"iterate.min_words ({it.min_words}) exceeds iterate.max_words "
                            f"({it.max_words}); lower min_words or raise max_words")
    if ranker_class(recipe.rank.ranker).programmatic and it.prompt_source != "seed":
        raise PrefloopError(f"rank.ranker {recipe.rank.ranker}: Self-Instruct prompts carry no "
                            "constraints; set iterate.prompt_source=seed (and an instructions "
                            "source with constraints, e.g. instructions.source=verifiable)")
    if it.n_candidates < 2:
        raise PrefloopError("iterate.n_candidates: a pair needs at least 2 candidates "
                            "(the paper uses 4)")


# -- merge: M_{t+1} as a plain model folder --------------------------------------------------------


def merge(recipe_t: Recipe, rdir: Path, *, force: bool = False) -> Path:
    """rounds/<t>/model = M_t's weights W + (α/r)·B·A, saved as safetensors + tokenizer."""
    from prefloop.models import load_adapter, load_model

    rnd = RunDir(rdir)
    out = rnd.merged_model
    stage = Stage(out, "model", {"model": recipe_t.model, "upstream": rnd.upstream("train")},
                  inputs=[rnd.stage("train")])
    if stage.begin(force=force):
        return out
    base, tok = load_model(recipe_t.model)
    fix = f"redo the loop: prefloop iterate --output-dir {rdir.parent.parent} --force"
    merged = load_adapter(base, rnd.adapter, fix).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return stage.finish({"parameters": sum(p.numel() for p in merged.parameters())},
                        extra={"base": recipe_t.model.name, "adapter": str(rnd.adapter),
                               "dtype": str(next(merged.parameters()).dtype).replace("torch.", "")})


# -- evaluation on the fixed held-out prompts ------------------------------------------------------


TRANSFER_GENERATIONS = "transfer_generations.jsonl"  # the transfer check's answers, per eval


def _eval_responses(recipe: Recipe, name: str, t: int, items: list[dict], out: Path,
                    transfer: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """One response per eval prompt (generations.jsonl) and per transfer prompt
    (TRANSFER_GENERATIONS) from model `name` (compare-section decoding), resumable; one load."""
    from prefloop.engine import Sampling
    from prefloop.engine.backends import load_backend
    from prefloop.engine.cache import answer_cache

    jobs = [(items, out / "generations.jsonl", ""),
            (transfer or [], out / TRANSFER_GENERATIONS, " transfer")]
    done = [generate.completed_groups(path, 1) for _, path, _ in jobs]
    if all(it["id"] in d for (group, _, _), d in zip(jobs, done, strict=True) for it in group):
        gens, transfer_gens = ([d[it["id"]][0] for it in group]
                               for (group, _, _), d in zip(jobs, done, strict=True))
        return gens, transfer_gens
    c = recipe.compare
    model = replace(recipe.model, name=name, revision=recipe.model.revision if t == 0 else None)
    backend = load_backend(model)
    if t == 0:  # M1 is the recipe's model: its answers are compare's original ones
        backend = answer_cache(backend, model)
    sampling = Sampling(temperature=c.temperature, top_p=c.top_p,
                        max_new_tokens=c.max_new_tokens, seed=c.seed)
    gens, transfer_gens = (generate.generate_responses(
        backend, group, path, k=1, sampling=sampling, system=recipe.model.system_prompt,
        batch_size=recipe.generate.batch_size, where=str(out), extra={"model": label(t)},
        desc=f"eval {label(t)}{what}") if group else [] for group, path, what in jobs)
    del backend
    _free()
    return gens, transfer_gens


def _eval_scores(judge, gens: list[dict], out: Path) -> dict[str, dict]:
    """Fixed-judge score of each eval response (None from a ranker that only compares); the
    judge's own log in `out` makes it resumable. id -> record."""
    path = out / "scores.jsonl"
    if not path.exists():
        if judge.pointwise:
            fields, _ = judge.score(gens, out)
        else:
            fields = [{"score": None, "scores": []} for _ in gens]
        write_jsonl(path, [{"id": g["id"], "ranker": judge.name, "score": f["score"],
                            "scores": f.get("scores", [])}
                           for g, f in zip(gens, fields, strict=True)])
    done = {r["id"]: r for r in read_jsonl(path)}
    return {g["id"]: done[g["id"]] for g in gens}


def _margins(judge, gens: list[dict], scores: dict, other_dir: Path,
             path: Path) -> list[float | None]:
    """margin(new, other) per eval prompt; pointwise from scores, else the ranker's compare."""
    other_gens = {g["id"]: g for g in read_jsonl(other_dir / "generations.jsonl")}
    other_scores = {r["id"]: r for r in read_jsonl(other_dir / "scores.jsonl")}
    done = {r["id"]: r for r in read_jsonl(path, allow_partial_tail=True)} if path.exists() else {}
    todo = [g for g in gens if g["id"] not in done]
    if todo:
        if judge.pointwise:
            rows = [{"id": g["id"], "margin": _diff(scores[g["id"]]["score"],
                                                    other_scores[g["id"]]["score"])}
                    for g in todo]
        else:
            m = judge.compare([g["instruction"] for g in todo], [g["response"] for g in todo],
                              [other_gens[g["id"]]["response"] for g in todo])
            rows = [{"id": g["id"], "margin": None if math.isnan(x) else float(x)}
                    for g, x in zip(todo, m, strict=True)]
        append_jsonl(path, rows)
        done = {r["id"]: r for r in read_jsonl(path)}
    return [done[g["id"]]["margin"] for g in gens]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def eval_stats(gens: list[dict], scores: dict, objective: list[dict] | None) -> dict:
    """Mean fixed-judge score, mean response length and judge parse failures of one model;
    with its `objective_reports`, its strict prompt-level accuracy (IFEval's)."""
    values = [r["score"] for r in scores.values() if r["score"] is not None]
    samples = [s for r in scores.values() for s in r["scores"]]
    return {
        "prompts": len(gens),
        "score_mean": round(statistics.fmean(values), 4) if values else None,
        "scored": len(values),
        "response_tokens_mean": round(statistics.fmean(g["response_tokens"] for g in gens), 1),
        "eos_rate": round(sum(g["finish_reason"] == "eos" for g in gens) / len(gens), 4),
        "judge_samples": len(samples),
        "judge_parse_failure_rate": (round(sum(s is None for s in samples) / len(samples), 4)
                                     if samples else None),
        "objective_strict": (round(side_summary(objective)["prompt_strict"], 4)
                             if objective else None),
    }


def objective_reports(items: list[dict], gens: list[dict]) -> list[dict] | None:
    """Each held-out item's constraint checks of its response in `gens` (any order), computed
    once for both the accuracy and the comparison with M1; None when the items carry no
    constraints."""
    if not items or not all(it.get("constraints") for it in items):
        return None
    by_id = {g["id"]: g["response"] for g in gens}
    return reports(items, [by_id[it["id"]] for it in items])


def objective_vs_start(items: list[dict], start: list[dict], objective: list[dict] | None,
                       seed: int = 0) -> dict | None:
    """M_t (its `objective_reports`) against M1 (`start`: its records) on the constrained
    held-out prompts, read as compare reads the DPO model against the original
    (`prefloop.constraints.evaluate`): the paired difference of strict prompt-level accuracy
    with its bootstrap 95% interval and McNemar p, and the guards that make a gain hollow
    (length collapse, copies, refusals, empty, bare, degenerate answers). None when the prompts
    carry no constraints."""
    if objective is None:
        return None
    rep = compare_reports(items, objective_reports(items, start), objective, seed)
    d = rep["difference"]
    return {"report": rep, "summary": {
        "difference": round(d["prompt_strict"], 4), "ci95": [round(x, 4) for x in d["ci95"]],
        "mcnemar_p": round(d["mcnemar_p"], 4), "only_new_right": d["only_dpo_right"],
        "only_m1_right": d["only_original_right"],
        "words_median": [rep["original"]["words_median"], rep["dpo"]["words_median"]],
        "guards_fired": rep["guards_fired"]}}


def evaluate(recipe: Recipe, run_dir: Path, t: int, *, force: bool = False) -> Path:
    """rounds/<t>/eval: M_{t+1} on the held-out prompts, judged by the fixed judge; for t >= 1
    also its margins and win rates against M_t (rounds/<t-1>/eval) and M1 (rounds/0/eval)."""
    run = RunDir(run_dir)
    rnd = run.round(t)
    out = rnd.stage("eval")
    name = model_name(recipe, run_dir, t)
    stage = Stage(out, "eval", {
        "compare": recipe.compare, "judge": recipe.rank, "start": recipe.model, "model": name,
        "upstream": run.upstream("instructions"),
        "trained": rnd.upstream("model") if t else None,
        "previous": run.round(t - 1).upstream("eval") if t else None},
        inputs=[run.stage("instructions"), *([rnd.stage("model"), run.round(t - 1).stage("eval")]
                                            if t else [])])
    if stage.begin(force=force):
        return out
    items = read_jsonl(run.heldout_instructions)
    transfer, note = instructions.transfer_draw(recipe)  # compare.transfer_n, untrained kinds
    if note and not t:  # the same for every round: said once, with M1's evaluation
        print(f"[prefloop] iterate: {note}", file=sys.stderr)
    gens, transfer_gens = _eval_responses(recipe, name, t, items, out, transfer)
    judge = make_ranker(recipe)  # fixed: the starting model, rank.judge_model or PairRM (lazy)
    scores = _eval_scores(judge, gens, out)
    objective = objective_reports(items, gens)
    counts = eval_stats(gens, scores, objective)
    others = sorted({t - 1, 0}) if t else []
    for o in others:  # M1 and the round before
        m = _margins(judge, gens, scores, run.round(o).stage("eval"),
                     out / f"vs_{label(o)}.jsonl")
        counts[f"vs_{label(o)}"] = win_rate(m)
        # the program's verdict next to the judge's, same prompts (against the round before:
        # does a round keep what the last one gained?)
        vs = objective_vs_start(items, read_jsonl(run.round(o).stage("eval") / "generations.jsonl"),
                                objective, seed=recipe.compare.seed)
        if vs is not None:
            atomic_write_json(out / f"objective_vs_{label(o)}.json", vs["report"])
            counts["objective_vs_M1" if o == 0 else "objective_vs_previous"] = vs["summary"]
    if transfer:  # the transfer check: M_t against M1 on kinds no round trained
        reports_t = objective_reports(transfer, transfer_gens)
        counts["transfer_strict"] = round(side_summary(reports_t)["prompt_strict"], 4)
        if t:
            vs = objective_vs_start(transfer, read_jsonl(run.round(0).stage("eval")
                                                         / TRANSFER_GENERATIONS),
                                    reports_t, seed=recipe.compare.seed)
            vs["report"]["reading"] = transfer_reading(vs["report"])
            atomic_write_json(out / "transfer_vs_M1.json", vs["report"])
            counts["transfer_vs_M1"] = {**vs["summary"], "reading": vs["report"]["reading"]}
    return stage.finish(counts, extra={"model": label(t), "model_path": name,
                                       "judge": judge.name})


# The recipe keys that an empty pairs stage names: iterate's, which round_recipe maps onto each
# round's generate section (pairs.RUN_KEYS names those of `prefloop run`).
PAIR_KEYS = {"k": "iterate.n_candidates", "temperature": "iterate.temperature",
             "max_new_tokens": "iterate.max_new_tokens",
             "judge": "set rank.judge_force_score=true (the score read from the self-judge's digit "
                      "probabilities) or raise iterate.judge_samples"}


# -- one round -------------------------------------------------------------------------------------


def _free() -> None:
    """Collect dropped models between steps so GPU memory is returned before the next load."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # torch is a dependency; keep the loop usable in stripped test envs
        pass


def run_round(recipe: Recipe, run_dir: Path, t: int) -> Path:
    """Round t: prompts, N candidates, self-judging, pairs, DPO against M_t, merge, evaluate."""
    rdir = RunDir(run_dir).round(t).root
    rr = round_recipe(recipe, run_dir, t)
    rdir.mkdir(parents=True, exist_ok=True)
    text = dump_recipe(rr)
    if not (rdir / "recipe.yaml").exists() or (rdir / "recipe.yaml").read_text("utf-8") != text:
        atomic_write_text(rdir / "recipe.yaml", text)
    steps = [("prompts", lambda: selfinstruct.run_round(recipe, run_dir, t)),
             ("generate", lambda: generate.run(rr, rdir)),
             ("rank", lambda: rank.run(rr, rdir)),
             ("pairs", lambda: pairs.run(rr, rdir, keys=PAIR_KEYS)),
             ("train", lambda: train.run(rr, rdir)),
             ("model", lambda: merge(rr, rdir)),
             ("eval", lambda: evaluate(recipe, run_dir, t))]
    for step, fn in steps:
        print(f"[prefloop] iterate: round {t}/{recipe.iterate.rounds} {step}", file=sys.stderr,
              flush=True)
        before, t0 = read_manifest(rdir / step), time.time()
        fn()
        _free()
        # stdout: the same line per stage as `prefloop run`, so each round's counts are seen
        skipped = before is not None and before == read_manifest(rdir / step)
        line = stage_line(step, rdir / step, None if skipped else time.time() - t0,
                          title=f"round {t} {step}")
        if line:
            print(line, flush=True)
    check = (read_manifest(rdir / "train") or {}).get("step0_check", {})
    if check and False in (check.get("reference_is_base_step0"), check.get("reference_is_base_end")):
        print(f"[prefloop] warning: round {t}: the DPO reference is not M{t}: {check}",
              file=sys.stderr)
    return rdir


# -- the loop as one unit: its configuration, --force kept aside ---------------------------------

LOOP_PARTS = ("instructions", "rounds", "report.md", "report.json", "plots")  # what a loop writes
LOOP_FILE = "loop.json"  # rounds/loop.json: the hash of the configuration the rounds ran with


def loop_config(recipe: Recipe) -> dict:
    """Everything the loop's results depend on: the recipe without push and without
    iterate.rounds (more rounds extend a finished loop; they change none of its rounds)."""
    d = hashable(redacted(recipe))  # settings added later, at their default: as before them
    d.pop("push", None)
    d["iterate"].pop("rounds", None)
    return d


def previous_dir(run_dir: Path) -> Path:
    """Where `iterate --force` keeps the finished loop until the new one finishes."""
    return Path(run_dir) / ".iterate.previous"


def recorded_loop(root: Path) -> str | None:
    """The configuration hash a loop folder (the run directory or the kept-aside one) ran with."""
    import json

    try:
        return json.loads((Path(root) / "rounds" / LOOP_FILE).read_text("utf-8"))["config_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume(recipe: Recipe, run_dir: Path, argv: list[str] | None = None) -> None:
    """Refuse, before anything is written, to continue a loop that ran with another
    configuration (its rounds would be overwritten one stage at a time); name the command that
    redoes it. Called by the CLI when --force is not given."""
    from prefloop.plan import describe_change

    run_dir = Path(run_dir)
    recorded, h = recorded_loop(run_dir), config_hash(loop_config(recipe))
    if recorded is None or recorded == h or recorded_loop(previous_dir(run_dir)) == h:
        return  # new, the same, or the kept-aside loop asked for again (run() restores it)
    command = shlex.join(["prefloop", *(argv or ["iterate", "--output-dir", str(run_dir)]),
                          "--force"])
    raise PrefloopError(f"{run_dir / 'rounds'}: the iterative loop ran with a different "
                        f"configuration{describe_change(run_dir, recipe)}; to redo it run: "
                        f"{command} (or use a new --output-dir)")


def _move_parts(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for part in LOOP_PARTS:
        if (src / part).exists():
            os.replace(src / part, dst / part)


def _drop_parts(root: Path) -> None:
    for part in LOOP_PARTS:
        path = root / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _restore_previous(run_dir: Path) -> None:
    prev = previous_dir(run_dir)
    _drop_parts(run_dir)
    _move_parts(prev, run_dir)
    shutil.rmtree(prev)


def _prepare(recipe: Recipe, run_dir: Path, force: bool) -> None:
    """Before the loop: with --force, put the finished loop aside (or, when a killed forced redo
    already put one aside, drop that redo's partial work); without, put a kept-aside loop back
    when its configuration is asked for again or nothing replaced it yet."""
    prev, h = previous_dir(run_dir), config_hash(loop_config(recipe))
    if force:
        if prev.exists():
            _drop_parts(run_dir)
        elif (run_dir / "rounds").exists() or (run_dir / "instructions").exists():
            _move_parts(run_dir, prev)
    elif prev.exists() and (recorded_loop(prev) == h != recorded_loop(run_dir)
                            or not (run_dir / "rounds").exists()):
        _restore_previous(run_dir)
    if recorded_loop(run_dir) is None:
        (run_dir / "rounds").mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "rounds" / LOOP_FILE, {"config_hash": h})


def run(recipe: Recipe, run_dir: Path, *, force: bool = False) -> Path:
    """All rounds, resuming from the last finished step; writes run_dir/report.md (also when a
    round stops on an error, with what finished and the reason).

    --force is transactional: the finished loop (instructions, rounds, report) is kept in
    .iterate.previous until the new one finishes, and put back if the new one fails; a killed
    forced redo resumes with the next `prefloop iterate --force`-less run, the old loop still
    aside."""
    check_recipe(recipe)
    run_dir = Path(run_dir)
    _prepare(recipe, run_dir, force)
    try:
        with transaction():  # failed stages are rolled back before the old loop comes back
            instructions.run(seed_recipe(recipe), run_dir)
            evaluate(recipe, run_dir, 0)
            try:
                for t in range(1, recipe.iterate.rounds + 1):
                    run_round(recipe, run_dir, t)
                    rows = [round_row(run_dir, s) for s in range(t + 1)]
                    print(summary_table(rows), flush=True)
            except PrefloopError as e:
                if not (force and previous_dir(run_dir).exists()):
                    write_report(recipe, run_dir, stopped=str(e))
                raise
    except Exception:
        if force and previous_dir(run_dir).exists():
            _restore_previous(run_dir)
            print("[prefloop] iterate: the forced redo failed; the previous loop is restored",
                  file=sys.stderr)
        raise
    write_report(recipe, run_dir)
    shutil.rmtree(previous_dir(run_dir), ignore_errors=True)
    print(f"[prefloop] iterate: report -> {run_dir / 'report.md'}", file=sys.stderr)
    return run_dir
