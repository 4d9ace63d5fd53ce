"""Turn any model location tsparse accepts into (model, tokenizer): an exported HF dir, a run dir at one of
its checkpoints, a `.ckpt` inside a run dir, or a hub id.

Nothing in a file runs: configs, tokenizers and models load with `trust_remote_code=False`, weights only
from safetensors (checkpoints with `weights_only=True`), and every dir is checked before it is used:
- `config.json` is JSON, its `model_type` is `tsparse_llama` or `llama`, and its spec keys are known;
- the weights are safetensors, readable, complete for the base and the attached modules, with the
  config's shapes, and small enough for this machine's memory.
Each failure is one ConfigError line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tsparse.checkpoint import load_checkpoint, load_state_dict_strict, newest_valid_checkpoint
from tsparse.checks import ConfigError
from tsparse.hub import require_hub
from tsparse.modeling_tsparse import MODULE_KEY_PATTERNS, TsparseForCausalLM
from tsparse.registry import KINDS

MODEL_SUBDIR = "model"               # RUN_DIR/model: the run's config and tokenizer
LM_EVAL_RESULTS = "lm_eval.json"      # tsparse.lm_eval's results, in the model or run dir
MODEL_TYPES = ("tsparse_llama", "llama")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or one ConfigError line."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def read_config(model_dir: Path):
    """The dir's config (TsparseConfig or LlamaConfig), after checking its type and spec keys."""
    from transformers import AutoConfig

    raw = read_json(model_dir / "config.json")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{model_dir}/config.json: model_type={model_type!r} is not allowed; "
                          f"tsparse loads one of {list(MODEL_TYPES)}")
    for name, kind in KINDS.items():
        spec = raw.get(name)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"{model_dir}/config.json: {name} must be an object of {kind.spec.__name__} keys")
        allowed = [f.name for f in dataclasses.fields(kind.spec)]
        if unknown := sorted(set(spec) - set(allowed)):
            raise ConfigError(f"{model_dir}/config.json: {name}.{unknown[0]} is not a {kind.spec.__name__} key; "
                              f"allowed: {allowed}")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{model_dir}/config.json is not a valid {model_type} config ({err})") from None


def read_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def safetensors_header(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the dir's safetensors file(s); pickle weights are refused."""
    from safetensors import safe_open

    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif (model_dir / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ConfigError(f"{model_dir} holds pickle weights ({pickled[0]}), which tsparse never loads; "
                              "re-save the model with save_pretrained (safetensors)")
        raise ConfigError(f"{model_dir} holds no {SAFETENSORS}")
    header = {}
    for name in files:
        try:
            with safe_open(model_dir / name, "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    header[key] = (piece.get_dtype(), piece.get_shape())
        except Exception as err:  # safetensors raises SafetensorError (not exported), OSError...
            raise ConfigError(f"{model_dir / name} is unreadable or truncated ({err})") from None
    return header


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(model_dir: Path, size: int) -> None:
    """Refuse a model of `size` bytes that the memory available cannot hold (e.g. a config.json asking for
    10**12 experts)."""
    available = available_memory()
    if size > available:
        raise ConfigError(f"{model_dir}: the model needs {size / 1e9:.1f} GB, more than the "
                          f"{available / 1e9:.1f} GB of memory available (check its config.json sizes)")


def is_module_key(key: str) -> bool:
    return any(re.search(pattern, key) for pattern in MODULE_KEY_PATTERNS)


def check_weights(model_dir: Path, config, allow_missing_modules: bool = False) -> None:
    """The dir's safetensors against the model its config builds: every tensor present (the modules' only
    when `allow_missing_modules` is false) with its shape, and the whole model within memory."""
    header = safetensors_header(model_dir)
    with torch.device("meta"):
        expected = model_class(config)(config).state_dict()
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    size = sum(t.numel() * _DTYPE_BYTES.get(header.get(k, ("F32",))[0], 4) for k, t in expected.items())
    check_fits(model_dir, size)
    missing = [k for k in expected if k not in header]
    base_missing = [k for k in missing if not is_module_key(k)]
    if base_missing:
        raise ConfigError(f"{model_dir}: {len(base_missing)} base weights are missing from its safetensors, "
                          f"e.g. {base_missing[0]}")
    if missing and not allow_missing_modules:
        raise ConfigError(f"{model_dir}: {len(missing)} weights of its attached modules are missing, e.g. "
                          f"{missing[0]} (pass --allow-missing-modules to start them fresh)")
    for key, tensor in expected.items():
        if key in header and list(header[key][1]) != list(tensor.shape):
            raise ConfigError(f"{model_dir}: {key} has shape {header[key][1]}, its config says {list(tensor.shape)}")


def model_class(config) -> type[nn.Module]:
    from transformers import LlamaForCausalLM

    return TsparseForCausalLM if config.model_type == TsparseForCausalLM.config_class.model_type else LlamaForCausalLM


def disable_progress_bar() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_model_dir(model_dir: Path, allow_missing_modules: bool = False):
    """(model, tokenizer) of an HF model dir, checked first (see the module docstring)."""
    config = read_config(model_dir)
    check_weights(model_dir, config, allow_missing_modules)
    tokenizer = read_tokenizer(model_dir)
    disable_progress_bar()  # the CLIs' output stays their own lines
    model = model_class(config).from_pretrained(model_dir, config=config, trust_remote_code=False,
                                                use_safetensors=True)
    return model.eval(), tokenizer


def run_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """The run's newest valid checkpoint (`last`, as training resumes it: last.ckpt unless damaged), its
    best (the `step*.ckpt` kept by ModelCheckpoint), or a given file."""
    ckpt_dir = run_dir / "checkpoints"
    if which == "last":
        path = newest_valid_checkpoint(ckpt_dir)
        if path is None:
            raise ConfigError(f"--checkpoint last: {ckpt_dir} holds no valid checkpoint")
    elif which == "best":
        best = sorted(ckpt_dir.glob("step*.ckpt"))
        if not best:
            raise ConfigError(f"--checkpoint best: {ckpt_dir} holds no step*.ckpt")
        path = best[-1]
    else:
        path = Path(which)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    return path


def run_config(run_dir: Path) -> DictConfig | None:
    """The run's resolved Hydra config (RUN_DIR/config.yaml), or None for a dir without one."""
    path = run_dir / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def load_run(run_dir: Path, which: str = "last"):
    """(model, tokenizer) of a run dir at one of its checkpoints, in eval mode, LoRA merged."""
    card = run_dir / MODEL_SUBDIR
    if not (card / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a tsparse run dir (no {MODEL_SUBDIR}/config.json)")
    config = read_config(card)
    ckpt = run_checkpoint(run_dir, which)
    with torch.device("meta"):
        size = sum(p.numel() * p.element_size() for p in TsparseForCausalLM(config).parameters())
    check_fits(card, size)
    model = TsparseForCausalLM(config)
    run_cfg = run_config(run_dir)
    lora = run_cfg is not None and run_cfg.optim.base == "lora"
    if lora:
        from tsparse.lora import add_lora

        add_lora(model, run_cfg.optim.lora_rank)
    state = load_checkpoint(ckpt, tables=True)["state_dict"]
    load_state_dict_strict(model, {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                           str(ckpt))
    if lora:
        from tsparse.lora import merge_lora

        merge_lora(model)
    return model.eval(), read_tokenizer(card)


def load_model(path: str | Path, which: str = "last", allow_missing_modules: bool = False):
    """(model, tokenizer) from an HF model dir, a tsparse run dir (or a .ckpt inside one), or a hub id (its
    config, tokenizer and safetensors are downloaded, then checked like a local dir)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return load_model_dir(path, allow_missing_modules)
    if path.is_file() and path.suffix == ".ckpt":
        return load_run(path.parent.parent, str(path))
    if path.is_dir():
        return load_run(path, which)
    return load_model_dir(hub_snapshot(str(path)), allow_missing_modules)


def hub_snapshot(name: str) -> Path:
    """The local copy of hub model `name`: its JSON files, tokenizer files and safetensors only (pickle
    weights are never downloaded), checked like any local dir when it is loaded."""
    if name.startswith(("/", ".")) or Path(name).suffix:
        raise ConfigError(f"{name} does not exist")
    require_hub(name, "a local HF model dir or a tsparse run dir")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def load_with_run_config(path: str | Path, which: str = "last"):
    """(model, tokenizer, the run's Hydra config or None) for any location `load_model` takes."""
    path = Path(path)
    model, tokenizer = load_model(path, which)
    return model, tokenizer, run_config(path.parent.parent if path.suffix == ".ckpt" else path)
