import json
import re

import pytest

from prefloop.artifacts import (
    RunDir,
    Stage,
    Upstream,
    append_jsonl,
    atomic_write_json,
    begin_stage,
    config_hash,
    read_jsonl,
    read_manifest,
    redone_inputs,
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


def test_a_stage_records_its_inputs_finish_ids_and_is_stale_once_one_is_redone(tmp_path):
    """The config hash stays the configuration's (two runs of one config agree); the manifest
    also records the finish id (new at every finish) of each stage it read, so a forced redo of
    an input makes it stale. A killed redo keeps the old input aside: not stale. Inputs recorded
    before finish ids existed never count."""
    run = RunDir(tmp_path)

    def finish(name, config, inputs=(), force=False):
        stage = Stage(run.stage(name), name, config, inputs=inputs)
        assert stage.begin(force=force) is False
        stage.finish()
        return read_manifest(run.stage(name))

    rank = finish("rank", {"a": 1})
    assert re.fullmatch(r"[0-9a-f]{16}", rank["finish_id"]) and rank["inputs"] == {}
    up = Upstream(run)
    config = {"b": 2, "upstream": up("rank")}
    assert up.folders == [run.stage("rank")] and config["upstream"] == rank["config_hash"]
    pairs = finish("pairs", config, up.folders)
    assert pairs["inputs"] == {"rank": rank["finish_id"]}
    assert pairs["config_hash"] == config_hash(config) and redone_inputs(run.stage("pairs")) == []
    assert begin_stage(run.stage("rank"), "rank", rank["config_hash"], force=True) is False
    assert redone_inputs(run.stage("pairs")) == []  # killed redo: the finished rank is aside
    again = finish("rank", {"a": 1}, force=True)
    assert again["config_hash"] == rank["config_hash"] and again["finish_id"] != rank["finish_id"]
    assert redone_inputs(run.stage("pairs")) == ["rank"]
    for old in ({"rank": None}, None):  # an input without a finish id; no inputs at all
        m = read_manifest(run.stage("pairs"))
        m["inputs"] = old
        atomic_write_json(run.stage("pairs") / "manifest.json", m)
        assert redone_inputs(run.stage("pairs")) == []


def test_atomic_files_are_readable_by_others(tmp_path):
    atomic_write_json(tmp_path / "x.json", {})
    assert (tmp_path / "x.json").stat().st_mode & 0o044 == 0o044
