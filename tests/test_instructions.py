import json

import pandas as pd
import pytest

from prefloop.config import InstructionsConfig, Recipe, recipe_from_dict
from prefloop.errors import PrefloopError
from prefloop.stages import instructions
from prefloop.stages.instructions import dedupe, load_local, load_source, normalize, split


def test_normalize_and_dedupe_keep_first():
    items = [{"id": "a", "instruction": "Hello  World"}, {"id": "b", "instruction": "hello world "},
             {"id": "c", "instruction": "HELLO\tWORLD!"}]
    assert normalize("  Hello \n World ") == "hello world"
    assert [i["id"] for i in dedupe(items)] == ["a", "c"]


def test_local_formats_and_field_autodetect(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question_id": "q1", "question": "What?"}\n\n'
                                      '{"question_id": "q2", "question": " Why? "}\n')
    (tmp_path / "b.json").write_text(json.dumps(["one", "two"]))
    pd.DataFrame({"prompt": ["x", "y"]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"messages": [[{"role": "system", "content": "s"},
                                {"role": "user", "content": "u1"}]]}).to_parquet(tmp_path / "d.parquet")
    assert load_local(tmp_path / "a.jsonl", None) == [{"id": "q1", "instruction": "What?"},
                                                      {"id": "q2", "instruction": "Why?"}]
    assert load_local(tmp_path / "b.json", None) == [{"id": "b-0", "instruction": "one"},
                                                     {"id": "b-1", "instruction": "two"}]
    assert [i["instruction"] for i in load_local(tmp_path / "c.csv", None)] == ["x", "y"]
    assert load_local(tmp_path / "d.parquet", None) == [{"id": "d-0", "instruction": "u1"}]


def test_lima_style_conversations_take_the_first_turn(tmp_path):
    p = tmp_path / "lima.jsonl"
    p.write_text(json.dumps({"conversations": ["first turn", "answer"]}) + "\n")
    assert load_local(p, None) == [{"id": "lima-0", "instruction": "first turn"}]


def test_builtin_source():
    items = load_source(InstructionsConfig(source="builtin"))
    assert len(items) == 100 and items[0]["id"] == "builtin-000"


@pytest.mark.parametrize("content,field,message", [
    ("", None, "{p}: file is empty; give at least one instruction"),
    ('{"question": "a"}\n{"question": "b"\n{"question": "c"}\n', None,
     "{p}:2: malformed JSON (Expecting ',' delimiter); fix or delete that line"),
    ('{"question": "a"}\n{"other": "b"}\n', None,
     "{p}:2: field 'question' is missing; fix the record or set instructions.field"),
    ('{"question": "a"}\n{"question": "  "}\n', None,
     "{p}:2: field 'question' is missing or empty (or holds only invisible characters); fix "
     "the record or set instructions.field"),
    ('{"question": "a"}\n', "prompt",
     "{p}: field 'prompt' not found (columns: question); set instructions.field to one of them"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, field, message):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(PrefloopError) as e:
        load_local(p, field)
    assert str(e.value) == message.format(p=p)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(PrefloopError, match="instructions file not found; check instructions.source"):
        load_local(tmp_path / "nope.jsonl", None)


def test_split_is_seeded_disjoint_and_checked():
    items = [{"id": str(i), "instruction": f"task {i}"} for i in range(30)]
    train, held = split(items, 5, 3, seed=1)
    again = split(items, 5, 3, seed=1)
    assert (train, held) == again
    assert [t["id"] for t in train] == ["4", "18", "27", "25", "24"]
    assert [t["id"] for t in held] == ["2", "8", "3"]
    assert not {t["id"] for t in train} & {h["id"] for h in held}
    with pytest.raises(PrefloopError) as e:
        split(items, 25, 10, seed=0)
    assert str(e.value) == (
        "instructions: 35 instructions requested (n_train 25 + n_heldout 10) but only 30 remain "
        "after de-duplication and filtering; lower n_train or n_heldout, or give a larger source")


def test_stage_writes_train_and_heldout_and_skips_when_done(tmp_path, lima_path):
    recipe = recipe_from_dict({"instructions": {"source": str(lima_path), "n_train": 50,
                                                "n_heldout": 10, "seed": 0}})
    out = instructions.run(recipe, tmp_path)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert (len(train), len(held)) == (50, 10)
    assert all(t["id"].startswith("lima_") for t in train)
    assert not {normalize(t["instruction"]) for t in train} & {normalize(h["instruction"])
                                                              for h in held}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"loaded": 1030, "after_dedupe_and_filter": 1030, "train": 50,
                                  "heldout": 10}
    mtime = (out / "train.jsonl").stat().st_mtime_ns
    instructions.run(recipe, tmp_path)
    assert (out / "train.jsonl").stat().st_mtime_ns == mtime


def test_hub_source_offline_gives_clear_error():
    r = Recipe()
    cfg = InstructionsConfig(source="GAIR/lima")
    with pytest.raises(PrefloopError) as e:
        load_source(cfg)
    assert "cannot load Hub dataset 'GAIR/lima'" in str(e.value)
    assert "local .jsonl/.json/.csv/.parquet file or 'builtin'" in str(e.value)
    assert r.instructions.source == "builtin"
