"""What `prefloop run` prints, as a user sees it: stdout holds one summary line per stage and
what compare prints (the table, the evaluation, the verdict); progress bars, start lines, logs
and warnings go to stderr; no per-step training dicts anywhere on stdout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_model_folder

SRC = Path(__file__).resolve().parents[1] / "src"

SETTINGS = ["instructions.n_train=6", "instructions.n_heldout=2", "generate.k=4",
            "generate.max_new_tokens=8", "pairs.require_eos=false", "pairs.length_match=0",
            "train.max_steps=2", "train.batch_size=2", "train.max_length=128",
            "compare.max_new_tokens=8", "rank.judge_samples=1", "rank.judge_max_new_tokens=4",
            # random 8-token answers sometimes hold a comma: pairs exist whatever the default's
            # kinds are
            "instructions.kinds=punctuation:no_comma",
            "compare.transfer_n=2"]  # the transfer check: instructions of the other kinds

FP32 = r"; float32 \(auto: this CPU has no native bf16 units\)"  # PREFLOOP_CPU_BF16=0 below
TIME = r"; (took \d+\.\ds|took \d+m\d\ds|took \d+h\d\dm)$"
SUMMARY = {  # stage -> the line's pattern, before its time
    "instructions": r"6 training \+ 2 held-out instructions \(of \d+ loaded, \d+ after "
                    r"de-duplication and filtering\)",
    "generate": r"24 responses to 6 instructions \(\d+ cut at max_new_tokens, \d+ tokens\)"
                + FP32,
    "rank": r"24 responses checked against their constraints \(no model\): mean satisfied "
            r"[\d.]+ strict, [\d.]+ loose; scored 0 as empty/refusal/copy/bare/degenerate: \d+/\d+/\d+/\d+/\d+",
    "pairs": r"\d+ pairs? from 6 instructions(, \d+ dropped \([^)]*\))?",
    "train": r"2 steps on \d+ pairs?, last loss [\d.]+, reward accuracy [\d.]+ on the last "
             r"training batch" + FP32,
    # the objective accuracy of both models and who won first, the judge's win-rate after it
    "compare": r"2 held-out instructions; strict accuracy original [\d.]+, DPO [\d.]+, difference "
               r"[+-][\d.]+ \(95% CI [+-][\d.]+ to [+-][\d.]+\): (DPO better|original better|"
               r"no detectable difference)( but hollow \(\d guards? fired\))?; transfer \(2 "
               r"instructions of untrained kinds\): original [\d.]+, DPO [\d.]+, difference "
               r"[+-][\d.]+ \(95% CI [+-][\d.]+ to [+-][\d.]+\): (no regression|regression|"
               r"at the floor|inconclusive)(, \d guards? fired)?; judge:\S+ win-rate "
               r"[\d.]+ \(95% CI [\d.]+-[\d.]+; \d+ wins, \d+ ties, \d+ losses\)" + FP32,
}


def prefloop(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "default",  # show every warning once: none may reach stdout
           "PREFLOOP_CPU_BF16": "0"}  # the same lines on any CPU: model.dtype auto is fp32
    return subprocess.run([sys.executable, "-m", "prefloop", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # every stage through the CLI, in a subprocess
def test_stdout_is_one_summary_line_per_stage_and_what_compare_prints(tmp_path):
    model = save_model_folder(tmp_path / "model")
    argv = ["run", "--output-dir", str(tmp_path / "run"), "--set", f"model.name={model}"]
    for s in SETTINGS:
        argv += ["--set", s]
    done = prefloop(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    ours = [line for line in lines if line.startswith("[prefloop]")]
    assert [line.split(":")[0] for line in ours] == [f"[prefloop] {s}" for s in SUMMARY]
    for line, (stage, pattern) in zip(ours, SUMMARY.items(), strict=True):
        assert re.fullmatch(rf"\[prefloop\] {stage}: {pattern}{TIME}", line), line
    # the five stages before compare print their line and nothing else; compare's own output
    # (table, evaluation, verdict) comes before its summary line, which ends stdout
    assert lines[:5] == ours[:5] and lines[-1] == ours[-1]
    compare = "\n".join(lines[5:-1])
    assert "instruction" in lines[5] and "original" in lines[5] and "dpo" in lines[5]
    assert "Verdict:" in compare
    assert re.search(r"^Transfer: (no regression|regression|at the floor|inconclusive) \(",
                     compare, re.M)
    for noise in ("{'loss'", "'grad_norm'", "train_runtime", "%|", "it/s", "Warning",
                  "warn", "Tokenizing"):
        assert noise not in done.stdout, noise
    # stderr: the start lines and the progress bars, the training bar included
    err = done.stderr
    for stage in SUMMARY:
        assert f"[prefloop] {stage} -> " in err
    assert re.search(r"train: 100%\|[^\n\r]*2/2", err), err[-2000:]
    assert "{'loss'" not in err  # the per-step numbers are in train/log.jsonl, not printed
    # every warning is shown once (PYTHONWARNINGS=default): none is a FutureWarning, and no
    # DeprecationWarning points at prefloop's code (a library's own use of a library, such as
    # matplotlib 3.8's of pyparsing 3.3, is not ours to fix)
    warned = re.findall(r"^(\S+):\d+: (\w*Warning): ", err, re.M)
    assert not [w for w in warned if w[1] == "FutureWarning"], err[-3000:]
    assert not [w for w in warned if "DeprecationWarning" in w[1]
                and "/src/prefloop/" in w[0]], err[-3000:]
    assert len((tmp_path / "run" / "train" / "log.jsonl").read_text().splitlines()) == 2

    again = prefloop(*argv, cwd=tmp_path)  # everything finished: skipped, and said so
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [
        re.sub(TIME, "; finished earlier", line) for line in ours]
    result = tmp_path / "run" / "compare" / "report.md"
    assert f"[prefloop] result: {result} (`prefloop show --output-dir " in again.stderr
    assert "## Verdict\n\nVerdict: " in result.read_text()
    shown = prefloop("show", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.splitlines() == lines[5:-1]
