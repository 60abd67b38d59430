"""The seed recipe end to end at its real shapes, with random weights, on one GPU.

Builds local stand-ins, then runs `python -m prefloop <stage> --recipe seed` one stage per
process and prints, per stage, the wall time of the process (imports and model loading
included), the stage's own `seconds` from its manifest, and the peak GPU memory of that process
(`torch.cuda.max_memory_allocated`, and the caching allocator's `max_memory_reserved`; the CUDA
context, about 0.5 GiB, is in neither). A table is printed last.

Stand-ins (random weights, nothing downloaded):
- policy: Mistral-7B-Instruct-v0.2's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP
  14336, vocab 32000, rope theta 1e6, no sliding window, context 32768) saved in bf16, with the
  real tokenizer (rebuilt from mistral-common's SentencePiece model as tests/mistral_tokenizer.py
  does, and the published chat template of tests/fixtures/mistral-7b-instruct-v0.2);
- ranker: PairRM's shape (DeBERTa-v3-large backbone, 24 layers, hidden 1024, vocab 128005, and
  the 2048->1024->1 head, 394 tensors, fp32 as on the Hub) with llm-blender's config.json
  (source 1224, candidate 412 tokens). Its tokenizer.json is the reference tokenizer of the
  parity fixture (tests/fixtures/pairrm: a 200-piece nmt_nfkc Unigram with PairRM's special and
  marker tokens) padded to 128,005 ids with pieces that never match text, markers moved to
  128001-128004 as in PairRM: the real DeBERTa-v3 spm.model is not available offline. Its
  200 pieces cut text into more tokens than DeBERTa's 128k would, but random-weight responses
  fill PairRM's candidate budget with either tokenizer.

Random weights rarely emit EOS, so every response runs to max_new_tokens (512 for the seed
recipe) and every PairRM pair is at its token budget: a worst case for generate, rank, train
(longest sequences) and compare.

    # here (CPU, needs mistral-common): the tokenizer folders, carried to the GPU machine
    python bench/seed_e2e.py --assets bench_assets --prepare-assets
    # GPU machine
    python3 bench/seed_e2e.py --assets bench_assets --lima lima_prompts.jsonl --work /tmp/seed
    # one engine only: --engines fast (it makes the first four stages itself when no trl run
    # in --work finished them) or --engines trl; --stages, --iterate, --no-seed --iterate
    # (flag combinations that mean nothing are refused in one line before anything is built)
    # CPU smoke test (tiny Mistral, full-size PairRM, 2 prompts x 2 x 8 tokens)
    python bench/seed_e2e.py --assets bench_assets --lima ../shared/data/lima_prompts.jsonl --tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("instructions", "generate", "rank", "pairs", "train", "compare")
ENGINES = ("trl", "fast")  # train.engine values, run in this order
PEAK_TAG = "SEED_E2E_PEAK "


# -- assets (built on a machine with mistral-common) ----------------------------------------------


def prepare_assets(assets: Path) -> None:
    """assets/mistral-tokenizer/{tokenizer.json,tokenizer_config.json}, assets/pairrm-tokenizer.json."""
    sys.path.insert(0, str(ROOT / "tests"))
    from mistral_tokenizer import load_hub_tokenizer

    tok = load_hub_tokenizer(assets / "mistral-tokenizer")
    print(f"mistral tokenizer: {len(tok)} ids, eos {tok.eos_token_id}", flush=True)
    write_pairrm_tokenizer(assets / "pairrm-tokenizer.json")


def write_pairrm_tokenizer(path: Path, vocab_size: int = 128005) -> None:
    """The fixture's reference tokenizer, padded to PairRM's vocabulary size (see module doc)."""
    data = json.loads((ROOT / "tests/fixtures/pairrm/tokenizer.json").read_text("utf-8"))
    vocab = data["model"]["vocab"]
    pieces = len(vocab)  # 200: ids 0-199; [MASK] 200 and the markers 201-204 are added tokens
    # U+E000 (private use) never occurs in the texts here; a score of -1e4 keeps them unused anyway.
    vocab.extend([f"\ue000{i}", -1e4] for i in range(pieces, vocab_size - 5))
    offset = (vocab_size - 5) - pieces
    for t in data["added_tokens"]:
        if t["id"] >= pieces:
            t["id"] += offset
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    from tokenizers import Tokenizer

    from prefloop.rankers.pairrm import PairRMTokenizer

    tok = PairRMTokenizer(Tokenizer.from_file(str(path)))
    assert tok.vocab_size == vocab_size and tok.source_id == vocab_size - 4, tok.vocab_size
    print(f"pairrm tokenizer: {tok.vocab_size} ids, markers from {tok.source_id}", flush=True)


# -- model folders (built where they run) ---------------------------------------------------------


def build_mistral(folder: Path, assets: Path, tiny: bool, device: str) -> None:
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    if (folder / "config.json").exists():
        return
    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg = MistralConfig(**shape, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
                        sliding_window=None, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                        tie_word_embeddings=False, dtype="bfloat16")
    started = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / "mistral-tokenizer" / name, tmp / name)
    os.replace(tmp, folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {folder}: {n / 1e9:.2f} B parameters in {time.time() - started:.1f} s", flush=True)


def build_pairrm(folder: Path, assets: Path, device: str) -> None:
    import torch
    from safetensors.torch import save_file

    from prefloop.rankers.pairrm import (
        BACKBONE_PREFIX,
        HEAD_KEYS,
        backbone_config,
        build_modules,
        expected_tensor_count,
    )

    if (folder / "model.safetensors").exists():
        return
    started = time.time()
    config = backbone_config()
    torch.manual_seed(0)
    with torch.device(device):
        backbone, head = build_modules(config)
    tensors = {BACKBONE_PREFIX + k: v.detach().float().contiguous().cpu()
               for k, v in backbone.state_dict().items()}
    head_tensors = [head.dense.weight, head.dense.bias, head.out.weight, head.out.bias]
    tensors |= {k: v.detach().float().contiguous().cpu()
                for k, v in zip(HEAD_KEYS, head_tensors, strict=True)}
    assert len(tensors) == expected_tensor_count(config), len(tensors)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    ranker = json.loads((ROOT / "tests/fixtures/pairrm/config.json").read_text())
    ranker.update(source_maxlength=1224, candidate_maxlength=412,
                  model_name="microsoft/deberta-v3-large (random weights, bench/seed_e2e.py)")
    (tmp / "config.json").write_text(json.dumps(ranker, indent=2))
    shutil.copy(assets / "pairrm-tokenizer.json", tmp / "tokenizer.json")
    os.replace(tmp, folder)
    n = sum(v.numel() for v in tensors.values())
    print(f"built {folder}: {n / 1e6:.0f} M parameters in {time.time() - started:.1f} s", flush=True)


# -- one stage in its own process -----------------------------------------------------------------


def child(argv: list[str]) -> int:
    """Run `prefloop <argv>` in this process, then print its peak GPU memory as one tagged line."""
    import torch

    from prefloop.cli import main

    started = time.time()
    rc = main(argv)
    peak = {"rc": rc, "seconds": round(time.time() - started, 2)}
    if torch.cuda.is_available():
        peak["alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(PEAK_TAG + json.dumps(peak), flush=True)
    return rc


def run_child(argv: list[str], log) -> dict:
    """`prefloop <argv>` in a fresh process; its output is echoed and logged; returns its peak line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv]
    print("$ prefloop " + " ".join(argv), flush=True)
    log.write("$ prefloop " + " ".join(argv) + "\n")
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1)
    peak: dict = {}
    for line in proc.stdout:
        if line.startswith(PEAK_TAG):
            peak = json.loads(line[len(PEAK_TAG):])
            continue
        sys.stdout.write(line)
        log.write(line)
        log.flush()
    rc = proc.wait()
    return {"rc": rc, "wall": round(time.time() - started, 1), **peak}


def manifest(stage_dir: Path) -> dict:
    path = stage_dir / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    except ImportError:
        pass
    return "cpu"


# -- main ---------------------------------------------------------------------------------------------


def seed_overrides(args, mistral: Path, pairrm: Path) -> list[str]:
    sets = [f"model.name={mistral}", f"rank.pairrm_model={pairrm}",
            f"instructions.source={args.lima}", "push.dataset_repo_id=", "push.adapter_repo_id="]
    if args.tiny:
        sets += ["instructions.n_train=2", "instructions.n_heldout=1", "generate.k=2",
                 "generate.max_new_tokens=8", "compare.max_new_tokens=8", "train.epochs=1",
                 "train.max_length=64"]
    return sets + args.set


def finished(stage_dir: Path) -> bool:
    return manifest(stage_dir).get("status") == "done"


def fast_stages(trl_dir: Path, fast_dir: Path) -> tuple[str, ...]:
    """The fast engine's run: the first four stages (the engine changes only train) copied from
    the trl run where it finished them, then train and compare; what the trl run has not
    finished, the fast run makes itself."""
    for stage in STAGES[:4]:
        if finished(trl_dir / stage) and not finished(fast_dir / stage):
            shutil.rmtree(fast_dir / stage, ignore_errors=True)
            shutil.copytree(trl_dir / stage, fast_dir / stage)
    return STAGES[4:] if all(finished(fast_dir / s) for s in STAGES[:4]) else STAGES


def run_seed(args, mistral: Path, pairrm: Path, log) -> list[dict]:
    """Every stage with train.engine=trl, then train + compare again with the fast engine on a
    copy of the run directory that holds the first four stages (`fast_stages`)."""
    rows = []
    base = seed_overrides(args, mistral, pairrm)
    trl_dir = args.work / "runs" / "seed-trl"
    for engine in [e for e in ENGINES if e in args.engines]:
        run_dir, stages = trl_dir, STAGES
        if engine == "fast":
            run_dir = args.work / "runs" / "seed-fast"
            stages = fast_stages(trl_dir, run_dir)
        for stage in stages:
            if args.stages and stage not in args.stages:
                continue
            done = bool(manifest(run_dir / stage))
            r = run_child([stage, "--recipe", "seed", "--output-dir", str(run_dir),
                           *[f"--set={s}" for s in base], f"--set=train.engine={engine}"], log)
            m = manifest(run_dir / stage)
            rows.append({"run": f"seed/{engine}", "stage": stage, "skipped": done, **r,
                         "stage_seconds": m.get("seconds"), "counts": m.get("counts", {})})
            print("ROW " + json.dumps(rows[-1]), flush=True)
            if r["rc"] != 0:
                return rows
    return rows


def run_iterate(args, mistral: Path, log) -> list[dict]:
    """One round of the self-reward recipe at the policy's shape, one process; per-step seconds
    from the round's manifests."""
    run_dir = args.work / "runs" / "self-reward"
    sets = [f"model.name={mistral}", f"instructions.source={args.lima}", "iterate.rounds=1",
            "rank.judge_force_score=true",  # random weights write no parsable score
            # random weights write no prompt that passes Self-Instruct's filters: seed prompts
            "iterate.prompt_source=seed"]
    if args.tiny:
        sets += ["iterate.prompts_per_round=2", "iterate.max_new_tokens=8", "iterate.eval_prompts=2",
                 "iterate.prompt_max_new_tokens=8", "rank.judge_max_new_tokens=8",
                 "instructions.n_train=20", "train.max_length=64"]
    r = run_child(["iterate", "--recipe", "self-reward", "--output-dir", str(run_dir),
                   *[f"--set={s}" for s in sets + args.iterate_set]], log)
    rows = [{"run": "self-reward", "stage": "iterate (whole, 1 round)", "skipped": False, **r,
             "stage_seconds": None, "counts": {}}]
    steps = [("round 0 eval", run_dir / "rounds" / "0" / "eval")]
    steps += [(f"round 1 {s}", run_dir / "rounds" / "1" / s)
              for s in ("instructions", "generate", "rank", "pairs", "train", "model", "eval")]
    for name, folder in steps:
        m = manifest(folder)
        if m:
            rows.append({"run": "self-reward", "stage": name, "stage_seconds": m.get("seconds"),
                         "counts": m.get("counts", {})})
    for row in rows:
        print("ROW " + json.dumps(row), flush=True)
    return rows


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    out = ["| run | stage | process wall s | stage s (manifest) | peak GiB alloc (reserved) | rc |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        peak = (f"{r['alloc_gib']:.1f} ({r['reserved_gib']:.1f})" if "alloc_gib" in r else "–")
        wall = fmt(r.get("wall"), ".1f") + (" (done before)" if r.get("skipped") else "")
        out.append(f"| {r['run']} | {r['stage']} | {wall} | {fmt(r.get('stage_seconds'), '.1f')} "
                   f"| {peak} | {r.get('rc', '')} |")
    return "\n".join(out)


def _names(p: argparse.ArgumentParser, flag: str, value: str, known: tuple[str, ...]) -> list[str]:
    names = [s for s in value.split(",") if s]
    wrong = [s for s in names if s not in known]
    if wrong:
        p.error(f"{flag}: unknown '{wrong[0]}'; give a comma-separated subset of {','.join(known)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, each combination either meaningful or refused in one line (argparse's exit 2)
    before anything is built."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", type=Path, required=True, help="tokenizer folder from --prepare-assets")
    p.add_argument("--prepare-assets", action="store_true", help="build the tokenizers and exit")
    p.add_argument("--lima", type=Path, default=ROOT.parent / "shared/data/lima_prompts.jsonl")
    p.add_argument("--work", type=Path, default=Path("/tmp/seed-e2e"))
    p.add_argument("--tiny", action="store_true", help="tiny Mistral, few tokens (CPU smoke test)")
    p.add_argument("--engines", default="trl,fast", help="train engines of the seed run: trl, "
                   "fast or both (fast alone makes the first four stages itself)")
    p.add_argument("--stages", default="", help="comma-separated subset of the seed stages")
    p.add_argument("--iterate", action="store_true", help="also one self-reward round")
    p.add_argument("--no-seed", action="store_true", help="skip the seed recipe")
    p.add_argument("--set", action="append", default=[], help="extra seed-recipe override")
    p.add_argument("--iterate-set", action="append", default=[])
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    args.engines = _names(p, "--engines", args.engines, ENGINES)
    args.stages = _names(p, "--stages", args.stages, STAGES)
    if args.prepare_assets:
        return args
    if not args.engines and not args.no_seed:
        p.error("--engines: empty; give trl, fast or trl,fast (or --no-seed --iterate)")
    if args.no_seed and not args.iterate:
        p.error("--no-seed without --iterate runs nothing; add --iterate or drop --no-seed")
    if args.no_seed and (args.set or args.stages):
        p.error("--set and --stages apply to the seed run, which --no-seed skips; use "
                "--iterate-set for the self-reward round")
    if args.iterate_set and not args.iterate:
        p.error("--iterate-set without --iterate: add --iterate")
    for need in ("mistral-tokenizer/tokenizer.json", "mistral-tokenizer/tokenizer_config.json",
                 "pairrm-tokenizer.json"):
        if not (args.assets / need).is_file():
            p.error(f"--assets {args.assets}: no {need}; build the folder with --assets "
                    f"{args.assets} --prepare-assets (on a machine with mistral-common)")
    args.lima = args.lima.resolve()
    if not args.lima.is_file():
        p.error(f"--lima {args.lima}: LIMA prompts not found (../shared/data/lima_prompts.jsonl)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.prepare_assets:
        try:
            prepare_assets(args.assets)
        except ModuleNotFoundError as e:
            sys.exit(f"--prepare-assets: needs the module {e.name}, not installed here (pip "
                     "install mistral-common sentencepiece)")
        return 0
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    mistral = args.work / ("mistral-7b-tiny" if args.tiny else "mistral-7b-instruct-v0.2-random")
    pairrm = args.work / "pairrm-random"
    build_mistral(mistral, args.assets, args.tiny, device)
    build_pairrm(pairrm, args.assets, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    rows: list[dict] = []
    with open(args.work / "log.txt", "a", encoding="utf-8") as log:
        if not args.no_seed:
            rows += run_seed(args, mistral, pairrm, log)
        if args.iterate:
            rows += run_iterate(args, mistral, log)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{datetime.date.today()} | {gpu_name()} | {platform.node()} | torch "
          f"{torch.__version__} | {'tiny' if args.tiny else 'full shape'}; random weights: "
          "every response runs to max_new_tokens (worst case)")
    print(table(rows))
    return 0 if all(r.get("rc", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
