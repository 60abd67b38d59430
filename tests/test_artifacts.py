import json
import re

import pytest

from prefloop.artifacts import (
    append_jsonl,
    atomic_write_json,
    begin_stage,
    read_jsonl,
    read_manifest,
    repair_jsonl_tail,
    upstream_hash,
    write_manifest,
)
from prefloop.errors import PrefloopError


def test_append_and_repair_a_cut_tail(tmp_path):
    p = tmp_path / "a.jsonl"
    append_jsonl(p, [{"i": 0}, {"i": 1}])
    with open(p, "a") as f:
        f.write('{"i": 2, "tr')  # a kill in the middle of a write
    assert read_jsonl(p, allow_partial_tail=True) == [{"i": 0}, {"i": 1}]
    with pytest.raises(PrefloopError, match=r"a.jsonl:3: malformed JSON"):
        read_jsonl(p)
    append_jsonl(p, [{"i": 3}])
    assert p.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 3}\n'
    repair_jsonl_tail(p)
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}, {"i": 3}]


def test_malformed_line_in_the_middle_names_the_line(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"a": 1}\n{oops}\n{"a": 2}\n')
    with pytest.raises(PrefloopError) as e:
        read_jsonl(p, allow_partial_tail=True)
    assert str(e.value).startswith(f"{p}:2: malformed JSON")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_stage_lifecycle(tmp_path):
    d = tmp_path / "gen"
    assert begin_stage(d, "generate", "h1") is False
    assert (d / "in_progress.json").exists()
    assert begin_stage(d, "generate", "h1") is False  # resume, same config
    with pytest.raises(PrefloopError, match="partial 'generate' stage from a different config"):
        begin_stage(d, "generate", "h2")
    write_manifest(d, "generate", "h1", started=0.0, counts={"n": 3})
    assert not (d / "in_progress.json").exists()
    assert read_manifest(d)["counts"] == {"n": 3}
    assert begin_stage(d, "generate", "h1") is True
    with pytest.raises(PrefloopError, match="finished with a different config"):
        begin_stage(d, "generate", "h2")
    (d / "junk").write_text("x")
    assert begin_stage(d, "generate", "h2", force=True) is False
    assert not (d / "junk").exists()
    with pytest.raises(PrefloopError, match="stage 'generate' has not finished"):
        upstream_hash(tmp_path, "generate")


def test_a_stage_built_on_an_output_chains_its_finish_id_new_at_every_finish(tmp_path):
    """The downstream chain reads the finish id (new at every finish), so a forced redo of a
    stage changes what the stages after it chain; a manifest of an earlier version, without a
    finish id, chains its config hash as before (its run directory stays finished)."""
    write_manifest(tmp_path / "generate", "generate", "h1", started=0.0)
    first = upstream_hash(tmp_path, "generate")
    assert re.fullmatch(r"[0-9a-f]{16}", first) and first != "h1"
    assert read_manifest(tmp_path / "generate")["finish_id"] == first
    assert begin_stage(tmp_path / "generate", "generate", "h1", force=True) is False
    write_manifest(tmp_path / "generate", "generate", "h1", started=0.0)  # the same config, again
    second = upstream_hash(tmp_path, "generate")
    assert re.fullmatch(r"[0-9a-f]{16}", second) and second != first
    old = read_manifest(tmp_path / "generate")
    del old["finish_id"]
    atomic_write_json(tmp_path / "generate" / "manifest.json", old)
    assert upstream_hash(tmp_path, "generate") == "h1"


def test_atomic_files_are_readable_by_others(tmp_path):
    atomic_write_json(tmp_path / "x.json", {})
    assert (tmp_path / "x.json").stat().st_mode & 0o044 == 0o044
