"""Stage 1: load instructions, de-duplicate, filter, and split into train and held-out sets.

Instructions may carry verifiable constraints (IFEval-style, prefloop.constraints): a
`constraints` field ([{"kind", "args"}, ...]) or IFEval's own `instruction_id_list` + `kwargs`
(google/IFEval). They travel with the instruction into every later artifact. A source whose
records name their own `split` ("train"/"heldout", as the built-in verifiable set does, held out
by topic) is split that way; others are split at random with the recipe's seed.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from prefloop.artifacts import RunDir, Stage, iter_jsonl, read_text, write_jsonl
from prefloop.config import InstructionsConfig, Recipe
from prefloop.errors import PrefloopError

FIELD_CANDIDATES = ("instruction", "prompt", "question", "query", "input", "text",
                    "conversations", "messages")
ID_CANDIDATES = ("id", "question_id", "prompt_id", "uid", "key")
SPLITS = ("train", "heldout")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def normalize(text: str) -> str:
    """De-duplication key: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def builtin_path(name: str = "builtin_instructions") -> Path:
    return Path(str(resources.files("prefloop") / "data" / f"{name}.jsonl"))


def _match_column(columns: list[str], name: str, where: str) -> str | None:
    """`name` among `columns`: exactly, else ignoring case; several case-insensitive matches
    are an error naming them."""
    if name in columns:
        return name
    hits = [c for c in columns if str(c).casefold() == name.casefold()]
    if len(hits) > 1:
        raise PrefloopError(f"{where}: columns {', '.join(map(repr, hits))} all match "
                            f"'{name}' ignoring case; set instructions.field to the exact one")
    return hits[0] if hits else None


def _pick_field(columns: list[str], field: str | None, where: str) -> str:
    if field:
        found = _match_column(columns, field, where)
        if found is None:
            raise PrefloopError(f"{where}: field '{field}' not found (columns: "
                                f"{', '.join(columns)}); set instructions.field to one of them")
        return found
    for name in FIELD_CANDIDATES:
        found = _match_column(columns, name, where)
        if found is not None:
            return found
    raise PrefloopError(f"{where}: no instruction field among {', '.join(columns)}; set "
                        f"instructions.field (looked for {', '.join(FIELD_CANDIDATES)})")


def _text_of(value, field: str, where: str) -> str:
    """The instruction text of one record; conversations give their first user turn."""
    if hasattr(value, "tolist"):  # parquet list columns arrive as numpy arrays
        value = value.tolist()
    if isinstance(value, list):
        if not value:
            raise PrefloopError(f"{where}: field '{field}' is an empty list; fix the record")
        first = value[0]
        if isinstance(first, dict):
            users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
            first = (users[0] if users else first).get("content")
        value = first
    if not isinstance(value, str) or not visible(value):
        raise PrefloopError(f"{where}: field '{field}' is missing or empty (or holds only "
                            "invisible characters); fix the record or set instructions.field")
    return value.strip()


def visible(text: str) -> str:
    """`text` without whitespace and invisible format characters (zero-width space and joiners,
    byte-order mark, direction marks: Unicode category Cf) and control characters."""
    import unicodedata

    return "".join(ch for ch in text
                   if not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc"))


def _rows_to_items(rows: list[dict], field: str | None, where: str, prefix: str,
                   line_of=lambda i: i + 1) -> list[dict]:
    if not rows:
        raise PrefloopError(f"{where}: no records; give a file with at least one instruction")
    name = _pick_field(list(rows[0].keys()), field, where)
    items = []
    for i, row in enumerate(rows):
        loc = f"{where}:{line_of(i)}"
        if name not in row:
            raise PrefloopError(f"{loc}: field '{name}' is missing; fix the record or set "
                                "instructions.field")
        rid = next((str(row[k]) for k in ID_CANDIDATES if row.get(k) not in (None, "")), None)
        item = {"id": rid or f"{prefix}-{i}", "instruction": _text_of(row[name], name, loc)}
        items.append(item | _verifiable_fields(row, loc))
    return items


def _verifiable_fields(row: dict, loc: str) -> dict:
    """constraints (checked, as {"kind", "args"} objects), and the bare task and split if given."""
    from prefloop.constraints import parse_constraints, parse_ifeval

    out: dict = {}
    if row.get("constraints") is not None:
        out["constraints"] = parse_constraints(_plain(row["constraints"]), loc)
    elif row.get("instruction_id_list") is not None:
        out["constraints"] = parse_ifeval(_plain(row["instruction_id_list"]),
                                          _plain(row.get("kwargs")), loc)
    if "constraints" in out:
        out["constraints"] = [c.to_json() for c in out["constraints"]]
        for key in ("task", "topic"):
            if isinstance(row.get(key), str) and row[key].strip():
                out[key] = row[key].strip()
    if row.get("split") in SPLITS:  # other values (a "test" column, say) are not ours
        out["split"] = row["split"]
    return out


def _plain(value):
    """Lists and dicts as JSON gives them (parquet hands numpy arrays, CSV hands strings)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def load_local(path: Path, field: str | None) -> list[dict]:
    """Read a local JSONL/JSON/CSV/Parquet file of instructions."""
    path = Path(path)
    if not path.exists():
        raise PrefloopError(f"{path}: instructions file not found; check instructions.source")
    if path.is_dir():
        raise PrefloopError(f"{path}: is a folder, not a file; set instructions.source to a "
                            f"{'/'.join(LOCAL_SUFFIXES)} file")
    if path.stat().st_size == 0:
        raise PrefloopError(f"{path}: file is empty; give at least one instruction")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        numbered = list(iter_jsonl(path))
        lines = [n for n, _ in numbered]
        return _rows_to_items([r for _, r in numbered], field, str(path), path.stem,
                              line_of=lambda i: lines[i])
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise PrefloopError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise PrefloopError(f"{path}: JSON nested too deeply to read; give a list of "
                                "records (or of strings)") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise PrefloopError(f"{path}: expected a JSON list of records or strings")
        rows = [r if isinstance(r, dict) else {"instruction": r} for r in data]
        return _rows_to_items(rows, field, str(path), path.stem, line_of=lambda i: f"record {i}")
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            df = (pd.read_csv(path, encoding="utf-8-sig") if suffix == ".csv"
                  else pd.read_parquet(path))
        except UnicodeDecodeError:
            read_text(path)  # raises the one-line message with the line of the bad byte
            raise
        except Exception as e:  # pandas raises many types for unreadable files
            raise PrefloopError(f"{path}: cannot read {suffix[1:]} ({e})") from None
        rows = df.where(df.notna(), None).to_dict("records")
        # CSV row i is line i + 2 (header is line 1); parquet rows are 0-based indices
        line_of = (lambda i: i + 2) if suffix == ".csv" else (lambda i: f"row {i}")
        return _rows_to_items(rows, field, str(path), path.stem, line_of=line_of)
    raise PrefloopError(f"{path}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)}")


def load_hub(cfg: InstructionsConfig) -> list[dict]:
    """A Hub dataset; for GAIR/lima the first user turn of `conversations`."""
    try:
        from datasets import load_dataset

        ds = load_dataset(cfg.source, split=cfg.split, revision=cfg.hub_revision)
    except Exception as e:  # datasets wraps network, auth and gating errors in many types
        raise hub_error(cfg, e) from None
    field = cfg.field or ("conversations" if cfg.source == "GAIR/lima" else None)
    prefix = cfg.source.split("/")[-1].lower()
    return _rows_to_items([dict(r) for r in ds], field, cfg.source, prefix)


def hub_error(cfg: InstructionsConfig, e: Exception) -> PrefloopError:
    """The loader's own reason (first line), and the gating/login hint only when it is one."""
    cause = (str(e).strip().splitlines() or [""])[0][:300]
    text = f"{type(e).__name__}: {cause}" if cause else type(e).__name__
    auth = any(w in f"{type(e).__name__} {e}".lower()
               for w in ("gated", "401", "403", "unauthorized", "authentic", "token", "login"))
    offline = any(w in f"{type(e).__name__} {e}".lower()
                  for w in ("offline", "connection", "resolve", "network", "timed out"))
    if auth:
        fix = ("gated sets such as GAIR/lima need their terms accepted on the Hub and "
               "`hf auth login`")
    elif offline:
        from prefloop.hub import TIMEOUT_ENV, endpoint, hub_timeout

        fix = (f"the Hub ({endpoint()}) cannot be reached (each request waits at most "
               f"{TIMEOUT_ENV}={hub_timeout():g} s); offline, use a local "
               ".jsonl/.json/.csv/.parquet file or 'builtin'")
    else:
        fix = (f"check instructions.source, instructions.split ('{cfg.split}') and "
               "instructions.hub_revision")
    return PrefloopError(f"instructions.source: cannot load Hub dataset '{cfg.source}' "
                         f"({text}); {fix}")


def load_source(cfg: InstructionsConfig) -> list[dict]:
    if cfg.source == "builtin":
        return load_local(builtin_path(), "instruction")
    if cfg.source == "verifiable":
        return load_local(builtin_path("verifiable_instructions"), "instruction")
    path = Path(cfg.source).expanduser()
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES:
        return load_local(path, cfg.field)
    return load_hub(cfg)


def dedupe(items: list[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = normalize(item["instruction"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def length_filter(items: list[dict], cfg: InstructionsConfig, tokenizer) -> list[dict]:
    if cfg.min_tokens is None and cfg.max_tokens is None:
        return items
    lo, hi = cfg.min_tokens or 0, cfg.max_tokens or 2**31
    return [it for it in items
            if lo <= len(tokenizer(it["instruction"], add_special_tokens=False)["input_ids"]) <= hi]


def split(items: list[dict], n_train: int, n_heldout: int, seed: int,
          where: str = "instructions") -> tuple[list[dict], list[dict]]:
    """Seeded sample of n_train + n_heldout distinct instructions, split into two disjoint sets."""
    need = n_train + n_heldout
    if need > len(items):
        raise PrefloopError(
            f"{where}: {need} instructions requested (n_train {n_train} + n_heldout {n_heldout}) "
            f"but only {len(items)} remain after de-duplication and filtering; lower n_train or "
            "n_heldout, or give a larger source"
        )
    chosen = random.Random(seed).sample(items, need)
    return disjoint(chosen[:n_train], chosen[n_train:], where)


def disjoint(train: list[dict], heldout: list[dict], where: str) -> tuple[list[dict], list[dict]]:
    """(train, heldout), or an error when an instruction is in both."""
    overlap = {normalize(t["instruction"]) for t in train} & {normalize(h["instruction"])
                                                              for h in heldout}
    if overlap:
        raise PrefloopError(f"{where}: train and held-out sets overlap on {len(overlap)} "
                            "instructions; de-duplicate the source")
    return train, heldout


def keep_kinds(items: list[dict], kinds: str | None, where: str,
               strip: bool = False) -> list[dict]:
    """Only instructions whose constraints are all of the given kinds (comma-separated ids).

    ``strip``: instead, every instruction with at least one constraint of the kinds, its other
    constraints removed and its text rebuilt from its ``task`` (the instruction without its
    constraint sentences, as in the built-in set); an instruction whose rebuilt text, pasted as
    the answer, would already meet every kept constraint is left out (a copy must never win)."""
    if not kinds:
        return items
    wanted = kind_set(kinds)
    if not any(it.get("constraints") for it in items):
        raise PrefloopError(f"{where}: its instructions carry no constraints, so "
                            "instructions.kinds cannot select any; set instructions.kinds=null "
                            "(and a rank.ranker other than constraints, e.g. judge), or use a "
                            "source with constraints (instructions.source=verifiable)")
    if strip:
        kept = strip_other_kinds(items, wanted, where)
    else:
        kept = [it for it in items if it.get("constraints")
                and {c["kind"] for c in it["constraints"]} <= wanted]
    if not kept:
        which = "has a constraint" if strip else "has only constraints"
        raise PrefloopError(f"{where}: no instruction {which} of the kinds "
                            f"{', '.join(sorted(wanted))}; widen instructions.kinds")
    return kept


def kind_set(kinds: str) -> set[str]:
    """The kind ids of instructions.kinds (comma-separated), each checked."""
    from prefloop.constraints import KINDS

    wanted = {k.strip() for k in kinds.split(",") if k.strip()}
    unknown = sorted(wanted - set(KINDS))
    if unknown:
        raise PrefloopError(f"instructions.kinds: unknown constraint kind '{unknown[0]}'; use ids "
                            "such as punctuation:no_comma (see docs/constraints.md)")
    return wanted


def strip_other_kinds(items: list[dict], wanted: set[str], where: str) -> list[dict]:
    """The instructions.strip_other_kinds reading of instructions.kinds (see keep_kinds)."""
    from prefloop.constraints import check, instruction_text, parse_constraints

    kept = []
    for n, it in enumerate(items):
        ours = [c for c in it.get("constraints") or [] if c["kind"] in wanted]
        if not ours:
            continue
        if len(ours) < len(it["constraints"]):
            task = it.get("task")
            if not isinstance(task, str) or not task.strip():
                raise PrefloopError(
                    f"{where}: record {n + 1} (id {it.get('id', '?')}) has no 'task' field, which "
                    "instructions.strip_other_kinds needs to rebuild the instruction without its "
                    "other constraints; add the field or set instructions.strip_other_kinds=false")
            constraints = parse_constraints(ours, f"{where}: record {n + 1}")
            text = instruction_text(task, constraints)
            if all(check(text, c).strict for c in constraints):
                continue
            it = {**it, "constraints": ours, "instruction": text}
        kept.append(it)
    return kept


def _sample(pool: list[dict], n: int, seed: int, where: str, key: str, what: str) -> list[dict]:
    if n > len(pool):
        raise PrefloopError(f"{where}: instructions.{key} is {n} but the source has only "
                            f"{len(pool)} {what} instructions after de-duplication and filtering;"
                            f" lower instructions.{key} or widen instructions.kinds")
    return random.Random(seed).sample(pool, n)


def validation_split(train: list[dict], where: str) -> tuple[list[dict], list[dict]]:
    """Every third training topic (sorted) becomes the validation set: disjoint by topic from
    the rest, as the held-out set is from the training set."""
    topics = sorted({it.get("topic", "") for it in train})
    if len(topics) < 2:
        raise PrefloopError(f"{where}: instructions.validation needs records of 2 or more topics")
    chosen = set(topics[1::3])
    return ([it for it in train if it.get("topic", "") not in chosen],
            [it for it in train if it.get("topic", "") in chosen])


def split_items(items: list[dict], cfg: InstructionsConfig,
                where: str) -> tuple[list[dict], list[dict]]:
    """The source's own train/held-out assignment when every record names one, else at random."""
    if not items or any("split" not in it for it in items):
        if cfg.validation:
            raise PrefloopError("instructions.validation: needs a source whose records name "
                                "their split and topic (instructions.source=verifiable)")
        return split(items, cfg.n_train, cfg.n_heldout, cfg.seed, where)
    train_pool = [it for it in items if it["split"] == "train"]
    heldout_pool = [it for it in items if it["split"] == "heldout"]
    if cfg.validation:  # tune on train topics only: the held-out records are never read
        train_pool, heldout_pool = validation_split(train_pool, where)
    train = _sample(train_pool, cfg.n_train, cfg.seed, where, "n_train", "training")
    heldout = _sample(heldout_pool, cfg.n_heldout, cfg.seed, where, "n_heldout",
                      "validation" if cfg.validation else "held-out")
    return disjoint(train, heldout, where)


def transfer_skipped(items: list[dict], cfg: InstructionsConfig) -> str | None:
    """Why the transfer check does not apply to this source and these kinds (None: it applies).
    It needs trained kinds to leave some out (instructions.kinds) and records that name their
    split (held-out topics); a source without them (LIMA prompts, a file of plain instructions)
    runs without it, as compare's objective evaluation runs only on constrained instructions."""
    if not cfg.kinds:
        return "instructions.kinds is not set, so no kind is left untrained"
    if not items or any("split" not in it for it in items):
        return (f"the records of instructions.source {cfg.source} do not name their split, and "
                "the check draws from held-out topics")
    return None


def transfer_pool(items: list[dict], cfg: InstructionsConfig) -> list[dict]:
    """The held-out side's instructions (the source's held-out records, or the validation topics
    with instructions.validation) whose constraints are all of kinds outside instructions.kinds:
    kinds the model was not trained on, on topics it was not trained on (see transfer_skipped)."""
    trained = kind_set(cfg.kinds)
    where = f"instructions.source {cfg.source}"
    if cfg.validation:  # as split_items: the held-out side is a split of the training topics
        side = validation_split([it for it in items if it["split"] == "train"], where)[1]
    else:
        side = [it for it in items if it["split"] == "heldout"]
    return [it for it in side if it.get("constraints")
            and not {c["kind"] for c in it["constraints"]} & trained]


def transfer_items(recipe: Recipe, n: int | None = None,
                   items: list[dict] | None = None) -> list[dict]:
    """The transfer set (`transfer_draw`), without the note."""
    return transfer_draw(recipe, n, items)[0]


def transfer_draw(recipe: Recipe, n: int | None = None,
                  items: list[dict] | None = None) -> tuple[list[dict], str | None]:
    """(the transfer set, the note compare and iterate print when it is skipped). The set: a
    draw of compare.transfer_n (or `n`) from `transfer_pool`, seeded by instructions.seed (a
    larger n extends a smaller one's draw); [] when it is 0 or the check does not apply, then
    with the note saying why (`transfer_skipped`; None for 0). With instructions.validation, at
    most what the validation topics hold. `items`: the source as the instructions stage reads it
    (de-duplicated, length-filtered), else read here (not at all without instructions.kinds)."""
    cfg = recipe.instructions
    n = recipe.compare.transfer_n if n is None else n
    if n == 0:
        return [], None
    if items is None and cfg.kinds:
        items = dedupe(load_source(cfg))
        if cfg.min_tokens is not None or cfg.max_tokens is not None:
            from prefloop.models import load_tokenizer

            items = length_filter(items, cfg, load_tokenizer(recipe.model.name,
                                                             recipe.model.revision))
    why = transfer_skipped(items or [], cfg)
    if why:
        return [], f"no transfer check: {why} (compare.transfer_n applies to a constrained source)"
    pool = transfer_pool(items, cfg)
    if cfg.validation:  # a tuning run: the validation topics hold fewer (26 of the default's)
        n = min(n, len(pool))
    if n > len(pool):
        raise PrefloopError(f"compare.transfer_n: is {n}, but the held-out topics of "
                            f"instructions.source {cfg.source} hold only {len(pool)} "
                            "instructions whose constraints are all of kinds outside "
                            f"instructions.kinds; lower compare.transfer_n to at most {len(pool)} "
                            "(0: no transfer check)")
    random.Random(cfg.seed).shuffle(pool)
    return pool[:n], None


def stage_config(recipe: Recipe, upstream) -> dict:
    """What the stage's manifest hash covers (prefloop.plan predicts it before a run)."""
    return {"instructions": recipe.instructions, "model": recipe.model.name}


def run(recipe: Recipe, run_dir: Path, *, force: bool = False) -> Path:
    cfg = recipe.instructions
    run = RunDir(run_dir)
    stage = Stage(run.stage("instructions"), "instructions", stage_config(recipe, run.upstream))
    if stage.begin(force=force):
        return stage.folder
    raw = load_source(cfg)
    items = dedupe(raw)
    if cfg.min_tokens is not None or cfg.max_tokens is not None:
        from prefloop.models import load_tokenizer

        items = length_filter(items, cfg, load_tokenizer(recipe.model.name, recipe.model.revision))
    loaded = items
    items = keep_kinds(items, cfg.kinds, f"instructions.source {cfg.source}",
                       cfg.strip_other_kinds)
    transfer_items(recipe, items=loaded)  # compare's transfer set can be drawn: refused now if not
    train, heldout = split_items(items, cfg, "instructions")
    write_jsonl(run.train_instructions, train)
    write_jsonl(run.heldout_instructions, heldout)
    return stage.finish({"loaded": len(raw), "after_dedupe_and_filter": len(items),
                         "train": len(train), "heldout": len(heldout)})
