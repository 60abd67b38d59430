import dataclasses
from pathlib import Path

import pytest

from prefloop.config import (
    SECTIONS,
    SHIPPED_RECIPES,
    Recipe,
    TrainConfig,
    apply_overrides,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    shipped_recipe_path,
)
from prefloop.errors import PrefloopError


@pytest.mark.parametrize("name", SHIPPED_RECIPES)
def test_every_shipped_recipe_loads_and_starts_with_a_command_comment(name):
    path = shipped_recipe_path(name)
    assert path.exists(), path
    first = path.read_text(encoding="utf-8").splitlines()[:6]
    assert first[0].startswith("# ")
    assert any("Command" in line for line in first) and any("Hardware" in line for line in first)
    r = load_recipe(name)
    assert r.name == name
    assert load_recipe(str(path)) == r


def test_default_recipe_is_offline_and_seed_is_the_mission():
    d, s = load_recipe("default"), load_recipe("seed")
    assert (d.model.name, d.instructions.source, d.rank.ranker, d.compare.ranker) == (
        "smollm2-135m-instruct", "verifiable", "constraints", "judge")
    assert d.instructions.n_heldout >= 60 and d.pairs.require_eos
    assert (s.model.name, s.instructions.source, s.rank.ranker) == (
        "mistralai/Mistral-7B-Instruct-v0.2", "GAIR/lima", "pairrm")
    assert (s.instructions.n_train, s.generate.k, s.instructions.n_heldout) == (50, 5, 10)
    assert (s.train.lora_r, s.train.lora_alpha, s.train.lora_dropout, s.train.beta) == (
        16, 32, 0.05, 0.1)


def test_precedence_defaults_recipe_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ntrain:\n  beta: 0.2\ngenerate:\n  k: 3\n")
    r = load_recipe(p, ["train.beta=0.05", "generate.temperature=1"])
    assert (r.train.beta, r.generate.k, r.generate.temperature, r.train.lora_r) == (
        0.05, 3, 1.0, 16)
    assert isinstance(r.generate.temperature, float)


@pytest.mark.parametrize("data,message", [
    ({"trian": {}}, "recipe: unknown key 'trian' (did you mean 'train'?)"),
    ({"train": {"betaa": 1}}, "recipe: train: unknown key 'betaa' (did you mean 'beta'?)"),
    ({"generate": {"k": "x"}}, "recipe: generate.k: expected an integer, got 'x'"),
    ({"generate": {"k": 0}}, "recipe: generate.k: must be > 0, got 0"),
    ({"generate": {"top_p": 2}}, "recipe: generate.top_p: must be in (0, 1], got 2.0"),
    ({"rank": {"ranker": "foo"}}, "recipe: rank.ranker: 'foo' is not one of judge, pairrm, constraints"),
    ({"train": {"qlora": "yes"}}, "recipe: train.qlora: expected true or false, got 'yes'"),
    ({"train": 3}, "recipe: train: expected a mapping of keys, got int"),
])
def test_bad_recipe_values_name_the_key(data, message):
    with pytest.raises(PrefloopError) as e:
        recipe_from_dict(data)
    assert str(e.value) == message


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(PrefloopError, match=r"--set: generate: unknown key 'kk'"):
        apply_overrides(Recipe(), ["generate.kk=3"])
    with pytest.raises(PrefloopError, match="expected section.key=value"):
        apply_overrides(Recipe(), ["generate"])
    with pytest.raises(PrefloopError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  beta: [1\n")
    with pytest.raises(PrefloopError, match=r"bad.yaml:\d+: invalid YAML"):
        load_recipe(bad)


def test_resolved_recipe_round_trips(tmp_path):
    r = apply_overrides(load_recipe("seed"), ["train.beta=0.3", "model.system_prompt=Be brief."])
    p = Path(tmp_path / "recipe.yaml")
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r


def test_exponent_without_dot_is_a_float():
    r = apply_overrides(Recipe(), ["train.learning_rate=1e-2"])
    assert r.train.learning_rate == 0.01
    with pytest.raises(PrefloopError, match="train.learning_rate: expected a number, got 'fast'"):
        apply_overrides(Recipe(), ["train.learning_rate=fast"])


DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_recipe_reference_is_generated_and_current():
    """docs/recipe.md is what prefloop.recipe_doc renders now: regenerate it after a config
    change (`PYTHONPATH=src python -m prefloop.recipe_doc > docs/recipe.md`)."""
    from prefloop import recipe_doc

    assert recipe_doc.missing_meanings() == []  # every key has its comment in config.py
    assert (DOCS / "recipe.md").read_text(encoding="utf-8") == recipe_doc.render()


def test_recipe_reference_rows_name_type_default_and_meaning():
    from prefloop import recipe_doc

    text = recipe_doc.render()
    assert ("| `grad_accum` | int | `1` | batches accumulated per optimizer step (TRL's name "
            "`gradient_accumulation_steps` is accepted too) |") in text
    assert "| `revision` | str or null | `null` | the Hub revision" in text
    assert "| `ranker` | one of: `judge`, `pairrm`, `constraints` | `\"judge\"` |" in text
    assert ("| `fast_min_chunk_tokens` | int | `8192` | engine fast: smallest chunk of pairs "
            "given a forward/backward of its own (> 0) |") in text
    n_keys = sum(len(dataclasses.fields(getattr(Recipe(), name))) for name in SECTIONS)
    assert text.count("\n| `") == n_keys + 1  # every key of every section, and `name`


def test_field_comments_join_the_lines_above_and_the_one_beside():
    from prefloop.recipe_doc import field_comments

    comments = field_comments(TrainConfig)
    assert comments["save_steps"] == (
        "a checkpoint (adapter, optimizer, scheduler, RNG, step) every this many optimizer steps, "
        "from which a killed train resumes; 0: none (a killed train starts again at step 1)")
    assert comments["eval_steps"] == "with eval_fraction > 0: optimizer steps between two evaluations"
    assert comments["fast_activation_budget_gb"].startswith("engine fast: activation memory")


def test_instruction_formats_page_names_what_the_loader_reads():
    from prefloop.stages.instructions import FIELD_CANDIDATES, ID_CANDIDATES, LOCAL_SUFFIXES

    text = (DOCS / "instructions.md").read_text(encoding="utf-8")
    for name in (*FIELD_CANDIDATES, *ID_CANDIDATES, *LOCAL_SUFFIXES, "constraints",
                 "instruction_id_list", "kwargs", "task", "topic", "split"):
        assert f"`{name}`" in text, name
