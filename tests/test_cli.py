import json

import pytest

from prefloop.cli import main


def test_instructions_subcommand_writes_the_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["instructions", "--output-dir", str(out), "--set", "instructions.n_train=7",
                 "--set", "instructions.n_heldout=3"])
    assert code == 0
    assert len((out / "instructions" / "train.jsonl").read_text().splitlines()) == 7
    assert len((out / "instructions" / "heldout.jsonl").read_text().splitlines()) == 3
    assert "n_train: 7" in (out / "recipe.yaml").read_text()
    # the run directory's recipe is reused when no --recipe is given
    assert main(["instructions", "--output-dir", str(out)]) == 0
    manifest = json.loads((out / "instructions" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 7


@pytest.mark.parametrize("argv,message", [
    (["instructions", "--set", "instructions.n_trian=3"],
     "prefloop: error: --set: instructions: unknown key 'n_trian' (did you mean 'n_train'?)\n"),
    (["instructions", "--set", "instructions.n_train=200", "--set", "instructions.source=builtin",
      "--set", "instructions.n_heldout=10", "--set", "instructions.kinds=null"],
     "prefloop: error: instructions: 210 instructions requested (n_train 200 + n_heldout 10) but "
     "only 100 remain after de-duplication and filtering; lower n_train or n_heldout, or give a "
     "larger source\n"),
    (["instructions", "--set", "instructions.n_train=300"],
     "prefloop: error: instructions: instructions.n_train is 300 but the source has only 259 "
     "training instructions after de-duplication and filtering; lower instructions.n_train or "
     "widen instructions.kinds\n"),
    (["instructions", "--set", "instructions.source=missing.jsonl"],
     "prefloop: error: missing.jsonl: instructions file not found; check instructions.source\n"),
    (["generate"],
     "prefloop: error: {out}/instructions: stage 'instructions' has not finished; run "
     "`prefloop instructions` --output-dir {out} first (or `prefloop run`)\n"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code = main([*argv, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1] + "\n" == message.format(out=out)


def test_unknown_model_name_fails_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["instructions", "--output-dir", str(out)]) == 0
    assert main(["generate", "--output-dir", str(out), "--set", "model.name=nonsense"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "prefloop: error: model.name: unknown model 'nonsense'")
    # before anything runs: a typo of the embedded name is refused with the right name
    assert main(["instructions", "--output-dir", str(tmp_path / "new"),
                 "--set", "model.name=smollm2-135m-instruc"]) == 2
    assert "did you mean the embedded 'smollm2-135m-instruct'?" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_out_of_memory_is_one_line_naming_the_setting(tmp_path, monkeypatch, capsys):
    import torch

    from prefloop.stages import generate

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(generate, "run", oom)
    assert main(["generate", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("prefloop: error: generate: out of memory (CUDA out of memory. Tried to "
                   "allocate 2.00 GiB); lower generate.batch_size (e.g. --set "
                   "generate.batch_size=64) or generate.max_new_tokens, then run the same "
                   "command again to resume")


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, monkeypatch):
    from prefloop.stages import generate

    def broken(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(generate, "run", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["generate", "--output-dir", str(tmp_path / "run")])
