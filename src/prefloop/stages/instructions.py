"""Stage 1: load instructions, de-duplicate, filter, and split into train and held-out sets."""

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
ID_CANDIDATES = ("id", "question_id", "prompt_id", "uid")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def normalize(text: str) -> str:
    """De-duplication key: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def builtin_path() -> Path:
    return Path(str(resources.files("prefloop") / "data" / "builtin_instructions.jsonl"))


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
    if not isinstance(value, str) or not value.strip():
        raise PrefloopError(f"{where}: field '{field}' is missing or empty; fix the record or "
                            "set instructions.field")
    return value.strip()


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
        items.append({"id": rid or f"{prefix}-{i}", "instruction": _text_of(row[name], name, loc)})
    return items


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
        fix = ("the Hub cannot be reached; offline, use a local .jsonl/.json/.csv/.parquet "
               "file or 'builtin'")
    else:
        fix = (f"check instructions.source, instructions.split ('{cfg.split}') and "
               "instructions.hub_revision")
    return PrefloopError(f"instructions.source: cannot load Hub dataset '{cfg.source}' "
                         f"({text}); {fix}")


def load_source(cfg: InstructionsConfig) -> list[dict]:
    if cfg.source == "builtin":
        return load_local(builtin_path(), "instruction")
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
    train, heldout = chosen[:n_train], chosen[n_train:]
    overlap = {normalize(t["instruction"]) for t in train} & {normalize(h["instruction"])
                                                              for h in heldout}
    if overlap:
        raise PrefloopError(f"{where}: train and held-out sets overlap on {len(overlap)} "
                            "instructions; de-duplicate the source")
    return train, heldout


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
    train, heldout = split(items, cfg.n_train, cfg.n_heldout, cfg.seed)
    write_jsonl(run.train_instructions, train)
    write_jsonl(run.heldout_instructions, heldout)
    return stage.finish({"loaded": len(raw), "after_dedupe_and_filter": len(items),
                         "train": len(train), "heldout": len(heldout)})
