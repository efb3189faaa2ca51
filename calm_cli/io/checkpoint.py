"""Reading and writing checkpoints: the authors' Hugging Face layout and our own.

The authors' files need a few rules (see tests/test_checkpoint.py for one test each):
- a CALM file carries the whole autoencoder as `ae_model.*`; without it the autoencoder
  comes from `ae_path` (resolved against the model directory, not the working directory;
  for a model from the hub, see io/hub.py `autoencoder_repo`) or from an explicit `ae=`
  path or hub id;
- an autoencoder-only file drops `decoder.lm_head_weight` (tied): we re-tie it;
- `generative_head.*` duplicates `mlp_generator.*`: either or both may be present;
- `.bin` files are read with `torch.load(weights_only=True)` only.
Our own layout (`save_model`) is one directory: config.json with the autoencoder config
embedded as `ae_config`, one model.safetensors, tokenizer.json. Saving replaces just those
three files, as one change (`io.atomic.replace_files`), and reads go through
`io.atomic.current_file`, so a save killed at any moment leaves a loadable model.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from ..errors import CalmError, UsageError
from ..models.autoencoder import Autoencoder
from ..models.baseline import ARCHITECTURE, TokenTransformer
from ..models.calm import CALM
from ..models.config import (
    AutoencoderConfig,
    CALMConfig,
    config_from_dict,
    config_to_dict,
    read_json,
)
from .atomic import current_file, replace_files
from .hub import cached_autoencoder, cached_model, parse_hub_id
from .registry import ModelSpec, resolve_model
from .tokenizer import load_tokenizer
from .tokenizer import vocab_size as tokenizer_vocab_size

TIED_AE_KEY = "decoder.lm_head_weight"


def read_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a checkpoint directory, and the format they came in."""
    single = current_file(directory, "model.safetensors")
    if single.exists():
        return _load_safetensors(single), "safetensors"
    for index_name, kind in (("model.safetensors.index.json", "safetensors-sharded"), ("pytorch_model.bin.index.json", "bin-sharded")):
        index = directory / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
                raise CalmError(f"{index}: no weight_map of tensor names to shard files")
            shards = sorted(set(weight_map.values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                path = directory / shard
                tensors.update(_load_safetensors(path) if shard.endswith(".safetensors") else _load_bin(path))
            return tensors, kind
    bin_file = directory / "pytorch_model.bin"
    if bin_file.exists():
        return _load_bin(bin_file), "bin"
    raise CalmError(f"{directory}: no model.safetensors, pytorch_model.bin or shard index found")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CalmError(f"{path}: cannot read safetensors file ({str(exc).splitlines()[0]})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CalmError(f"{path}: refused: the pickle needs code to load (only plain tensors are accepted)") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CalmError(f"{path}: cannot read PyTorch file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CalmError(f"{path}: not a state dict of tensors")
    return data


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def infer_ae_config(tensors: dict[str, torch.Tensor], base: dict[str, Any]) -> AutoencoderConfig:
    """Autoencoder shape read off its tensors; eps and token ids from `base` (its own config.json)."""
    try:
        vocab, hidden = tensors["encoder.embed_tokens.weight"].shape
        shape = {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "patch_size": tensors["encoder.squeeze_layer.weight"].shape[1] // hidden,
            "latent_size": tensors["decoder.latent_to_hidden.weight"].shape[1],
            "intermediate_size": tensors["encoder.encoder_layers.0.mlp.gate_proj.weight"].shape[0],
            "num_encoder_layers": len({k.split(".")[2] for k in tensors if k.startswith("encoder.encoder_layers.")}),
            "num_decoder_layers": len({k.split(".")[2] for k in tensors if k.startswith("decoder.decoder_layers.")}),
        }
    except KeyError as exc:
        raise CalmError(f"autoencoder weights lack tensor {exc.args[0]}") from None
    return config_from_dict(AutoencoderConfig, {**base, **shape}, "autoencoder config")


def load_weights(
    module: nn.Module, tensors: dict[str, torch.Tensor], source: str, skip: Callable[[str], bool] = lambda key: False
) -> None:
    """Copy tensors into `module`, naming the first missing, unexpected or misshapen tensor.

    Keys for which `skip` is true (a tied alias, a submodule loaded elsewhere) are neither
    expected nor loaded.
    """
    _check_tensors(module, tensors, source, skip)
    module.load_state_dict(tensors, strict=False)  # the checks above are strict about the rest


def build(factory: Callable[[], nn.Module], tensors: dict[str, torch.Tensor], source: str, skip: Callable[[str], bool] = lambda key: False) -> nn.Module:
    """`factory()` loaded with `tensors`, checked first on a memory-free meta-device copy.

    A config.json that does not match the weights (or asks for an absurd size) is refused
    before any memory is allocated for it.
    """
    with torch.device("meta"):
        _check_tensors(_construct(factory, source), tensors, source, skip)
    module = _construct(factory, source)
    module.load_state_dict(tensors, strict=False)
    return module


def _construct(factory: Callable[[], nn.Module], source: str) -> nn.Module:
    try:
        return factory()
    except (RuntimeError, MemoryError, OverflowError) as exc:
        raise CalmError(f"{source}: cannot build the model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _check_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], source: str, skip: Callable[[str], bool]) -> None:
    """Name the first missing, unexpected or misshapen tensor."""
    own = {k: v for k, v in module.state_dict().items() if not skip(k)}
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing:
        raise CalmError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        raise CalmError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected)")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise CalmError(f"{source}: tensor '{k}' has shape {list(v.shape)}, the config needs {list(own[k].shape)}")


def _autoencoder_from_tensors(ae_tensors: dict[str, torch.Tensor], base: dict[str, Any], source: str) -> Autoencoder:
    config = infer_ae_config(ae_tensors, base)
    tied = ae_tensors.pop(TIED_AE_KEY, None)
    ae = build(lambda: Autoencoder(config), ae_tensors, source, skip=lambda key: key == TIED_AE_KEY)
    if tied is not None and not torch.equal(tied, ae_tensors["encoder.embed_tokens.weight"]):
        ae.decoder.lm_head_weight = nn.Parameter(tied.clone())
    return ae


def _resolve(path_str: str, directory: Path) -> Path:
    path = Path(path_str).expanduser()
    return path if path.is_absolute() else (directory / path).resolve()


def load_autoencoder(path: ModelSpec = None, *, device=None, dtype=None, tokenizer: str | None = None) -> Autoencoder:
    """An autoencoder-only directory, or the autoencoder inside a CALM directory."""
    directory = _check_dir(path)
    config = read_config(directory)
    if _is_calm(config):
        model = load_model(directory, device=device, dtype=dtype, tokenizer=tokenizer)
        model.ae_model.tokenizer = model.tokenizer
        return model.ae_model
    tensors, _ = read_state_dict(directory)
    ae = _autoencoder_from_tensors(tensors, config, str(directory))
    ae.tokenizer = _find_tokenizer(directory, tokenizer, ae.config.vocab_size)
    return _place(ae, device, dtype)


def load_model(
    path: ModelSpec = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    ae: str | None = None,
    tokenizer: str | None = None,
) -> CALM:
    """Load a CALM checkpoint (the authors' layout or ours) ready for inference: a directory or a model name (default: `default`)."""
    directory = _check_dir(path)
    raw = read_config(directory)
    if "TokenTransformer" in (raw.get("architectures") or []):
        raise CalmError(f"{directory}: a token-level baseline, not a CALM model (load it with calm_cli.io.checkpoint.load_baseline)")
    if not _is_calm(raw):
        raise CalmError(f"{directory}: config.json describes an autoencoder, not a CALM model (use calm encode/decode)")
    config = config_from_dict(CALMConfig, raw, str(current_file(directory, "config.json")))
    tensors, fmt = read_state_dict(directory)
    ae_tensors = _strip("ae_model.", tensors)
    ae_base: dict[str, Any] = dict(raw.get("ae_config") or {})
    ae_dir = _autoencoder_dir(ae) if ae else (_resolve(config.ae_path, directory) if config.ae_path else None)
    if not ae and not ae_tensors and ae_dir is not None and not current_file(ae_dir, "config.json").exists():
        ae_dir = cached_autoencoder(directory, config.ae_path) or ae_dir
    if ae_dir is not None and (ae or not ae_tensors):
        if not current_file(ae_dir, "config.json").exists():
            raise CalmError(f"autoencoder directory {ae_dir} not found (set --ae PATH)")
        ae_base = read_config(ae_dir)
        ae_tensors, _ = read_state_dict(ae_dir)
    elif ae_dir is not None and current_file(ae_dir, "config.json").exists() and not ae_base:
        ae_base = read_config(ae_dir)
    if not ae_tensors:
        raise CalmError(f"{directory}: no ae_model.* tensors and no autoencoder found (set --ae PATH)")
    autoencoder = _autoencoder_from_tensors(ae_tensors, ae_base, f"{directory} (autoencoder)")

    head = _strip("generative_head.", tensors) or _strip("mlp_generator.", tensors)
    calm_tensors = {k: v for k, v in tensors.items() if k.split(".")[0] in ("transformer", "embed_proj")}
    calm_tensors.update({f"generative_head.{k}": v for k, v in head.items()})
    if autoencoder.config.patch_size != config.patch_size or autoencoder.config.latent_size != config.latent_size:
        raise CalmError(
            f"{directory}: autoencoder has patch_size {autoencoder.config.patch_size}, latent_size "
            f"{autoencoder.config.latent_size}; the model needs {config.patch_size}, {config.latent_size}"
        )
    model = build(lambda: CALM(config, autoencoder), calm_tensors, str(directory), skip=lambda key: key.startswith("ae_model."))
    model.tokenizer = _find_tokenizer(directory, tokenizer, config.vocab_size, ae_dir)
    model.source_format = fmt
    return _place(model, device, dtype)


def _autoencoder_dir(ae: str) -> Path:
    """--ae as a directory: a path, or a hub id (org/name) in the Hugging Face cache when no such path exists."""
    path = Path(ae).expanduser()
    hub = parse_hub_id(str(ae)) if not path.exists() else None
    if hub is None:
        return path
    found = cached_model(hub)
    if found is None:
        raise UsageError(f"autoencoder {hub}: not in the Hugging Face cache; run 'calm pull {hub}'")
    return found


def read_config(directory: Path) -> dict[str, Any]:
    """A model folder's config.json, with the fields that decide how it is read checked for type."""
    path = current_file(directory, "config.json")
    raw = read_json(path)
    architectures = raw.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise CalmError(f"{path}: 'architectures' must be a list of names")
    if raw.get("ae_config") is not None and not isinstance(raw["ae_config"], dict):
        raise CalmError(f"{path}: 'ae_config' must be a JSON object")
    return raw


def _is_calm(config: dict[str, Any]) -> bool:
    architectures = config.get("architectures") or []
    if "TokenTransformer" in architectures:
        return False
    return "num_hidden_layers" in config or "EnergyTransformer" in architectures


def _check_dir(path: ModelSpec) -> Path:
    """A model directory from a name or path; a missing one is the caller's mistake (exit 2)."""
    return resolve_model(path)


def _find_tokenizer(directory: Path, explicit: str | None, vocab_size: int, fallback: Path | None = None) -> Tokenizer | None:
    candidates = [Path(explicit).expanduser()] if explicit else [current_file(directory, "tokenizer.json")]
    if not explicit and fallback is not None:
        candidates.append(current_file(fallback, "tokenizer.json"))
    for candidate in candidates:
        if candidate.exists():
            tok = load_tokenizer(candidate)
            if tokenizer_vocab_size(tok) > vocab_size:
                raise CalmError(f"{candidate}: tokenizer has {tokenizer_vocab_size(tok)} tokens but the model's vocabulary is {vocab_size}")
            return tok
    if explicit:
        raise UsageError(f"{explicit}: no such tokenizer file")
    return None


def _place(module, device, dtype):
    module.eval().requires_grad_(False)
    return module.to(device=device, dtype=dtype)


def save_model(model: CALM, directory: str | os.PathLike, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write our layout into `directory`, replacing only its config, weights and tokenizer (see `write_directory`)."""
    target = Path(directory).expanduser()
    write_directory(target, calm_files(model, dtype), force=force)
    return target


def calm_files(model: CALM, dtype: torch.dtype | None = None, state: dict[str, torch.Tensor] | None = None) -> dict[str, FileWriter]:
    """The writers of a CALM model's files in our layout (the tied autoencoder head is not stored twice).

    `state` replaces model.state_dict(): a sharded run passes the full weights it gathered.
    """
    config = config_to_dict(model.config)
    config.pop("ae_path", None)
    config["architectures"] = ["EnergyTransformer"]
    config["ae_config"] = config_to_dict(model.ae_config)
    tied = model.ae_model.decoder.lm_head_weight is model.ae_model.encoder.embed_tokens.weight
    tensors = {}
    for k, v in (model.state_dict() if state is None else state).items():
        if k == f"ae_model.{TIED_AE_KEY}" and tied:
            continue
        tensors[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
    return model_files(config, tensors, getattr(model, "tokenizer", None))


FileWriter = Callable[[Path], None]
OWNED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def model_files(config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Tokenizer | None) -> dict[str, FileWriter]:
    """Writers for config.json, model.safetensors and (when there is one) tokenizer.json."""
    config = {**config, "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    files: dict[str, FileWriter] = {
        "model.safetensors": lambda path: save_file(state, str(path), metadata={"format": "pt"}),
        "config.json": lambda path: path.write_text(text, encoding="utf-8"),
    }
    if tokenizer is not None:
        files["tokenizer.json"] = lambda path: tokenizer.save(str(path))
    return files


def write_directory(target: Path, files: dict[str, FileWriter], force: bool = False) -> None:
    """Replace `files` in the model folder `target` as one change, keeping every other file in it.

    A folder that exists, is not empty and holds no model (no config.json) is refused
    unless `force`: the files would land among someone else's. A kill at any moment
    leaves the previous model or the new one loadable (`replace_files`).
    """
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: exists and is not a folder")
    if target.is_dir() and not force and not _holds_model(target):
        raise UsageError(f"{target}: folder is not empty and holds no model (pass --force to add the model's files to it)")
    stale = [name for name in OWNED_FILES if name not in files and target.is_dir() and current_file(target, name).exists()]
    if stale:  # it would stay beside the new model and be read as its own
        raise UsageError(f"{target}: holds a {stale[0]} that this model does not have; remove it or save elsewhere")
    try:
        replace_files(target, files)
    except OSError as exc:
        raise CalmError(f"{target}: cannot write the model ({exc.strerror or exc})") from None


def _holds_model(folder: Path) -> bool:
    """Empty, or a model folder: one with config.json, or one a save into it was interrupted in."""
    return not any(folder.iterdir()) or current_file(folder, "config.json").is_file()


def describe(path: ModelSpec = None) -> dict[str, Any]:
    """What `calm info` prints: the config, K, parameter counts per part, dtype and file format."""
    directory = _check_dir(path)
    raw = read_config(directory)
    if "TokenTransformer" in (raw.get("architectures") or []):
        baseline = load_baseline(directory)
        counts = baseline.parameter_counts()
        unused = {"latent_size", "noise_size", "num_mlp_layers", "num_samples", "beta", "ae_path"}  # CALM-only fields
        return {
            "path": str(directory), "kind": "baseline (token-level)", "patch_size (K)": 1,
            "stored dtype": raw.get("torch_dtype", "unknown"),
            "parameters": {**counts, "total": sum(counts.values())},
            "config": {k: v for k, v in config_to_dict(baseline.config).items() if k not in unused},
            "tokenizer": "tokenizer.json" if baseline.tokenizer is not None else "none",
        }
    if not _is_calm(raw):
        ae = load_autoencoder(directory)
        return {
            "path": str(directory), "kind": "autoencoder", "patch_size (K)": ae.config.patch_size,
            "parameters": {"autoencoder": sum(p.numel() for p in ae.parameters())},
            "config": config_to_dict(ae.config),
        }
    model = load_model(directory)
    fmt = getattr(model, "source_format", "?")
    counts = model.parameter_counts()
    return {
        "path": str(directory),
        "kind": "calm",
        "patch_size (K)": model.config.patch_size,
        "file format": fmt,
        "stored dtype": raw.get("torch_dtype", "unknown"),
        "parameters": {**counts, "total": sum(counts.values())},
        "config": {k: v for k, v in config_to_dict(model.config).items() if k != "ae_config"},
        "autoencoder config": config_to_dict(model.ae_config),
        "tokenizer": "tokenizer.json" if model.tokenizer is not None else "none",
    }


# ---- the token-level baseline ------------------------------------------------------------------


def is_baseline(config: dict[str, Any]) -> bool:
    """True for a config.json written by `save_baseline`."""
    return ARCHITECTURE in (config.get("architectures") or [])


def is_baseline_dir(directory: Path) -> bool:
    """True for a model directory written by `save_baseline` (False when it has no config.json)."""
    return current_file(directory, "config.json").is_file() and is_baseline(read_config(directory))


def save_baseline(model: TokenTransformer, directory: str | os.PathLike, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write config.json, model.safetensors and tokenizer.json into `directory` (see `write_directory`)."""
    target = Path(directory).expanduser()
    write_directory(target, baseline_files(model, dtype), force=force)
    return target


def baseline_files(model: TokenTransformer, dtype: torch.dtype | None = None, state: dict[str, torch.Tensor] | None = None) -> dict[str, FileWriter]:
    """The writers of a token-level baseline's files in our layout (`state`: as for calm_files)."""
    config = config_to_dict(model.config)
    config.pop("ae_path", None)
    config["architectures"] = [ARCHITECTURE]
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in (model.state_dict() if state is None else state).items()
    }
    return model_files(config, state, model.tokenizer)


def load_baseline(
    path: ModelSpec = "baseline",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
) -> TokenTransformer:
    """Load a `save_baseline` directory (or model name) ready for inference (eval mode, no gradients)."""
    directory = resolve_model(path)
    raw = read_config(directory)
    if not is_baseline(raw):
        raise CalmError(f"{directory}: config.json does not describe a {ARCHITECTURE} model")
    config = config_from_dict(CALMConfig, raw, str(current_file(directory, "config.json")))
    tensors, _ = read_state_dict(directory)
    model = build(lambda: TokenTransformer(config), tensors, str(directory))
    tok_path = Path(tokenizer).expanduser() if tokenizer else current_file(directory, "tokenizer.json")
    if tok_path.exists():
        model.tokenizer = load_tokenizer(tok_path)
        if tokenizer_vocab_size(model.tokenizer) > model.config.vocab_size:
            raise CalmError(f"{tok_path}: tokenizer has more tokens than the model's vocabulary {model.config.vocab_size}")
    elif tokenizer:
        raise UsageError(f"{tokenizer}: no such tokenizer file")
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def load(
    model: ModelSpec = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    ae: str | None = None,
    tokenizer: str | None = None,
    download: bool = False,
) -> CALM | TokenTransformer:
    """Whatever the directory holds, CALM or token-level baseline, by name, path or hub id (default: $CALM_MODEL, else `default`).

    A hub id not yet in the Hugging Face cache is downloaded only with `download=True`.
    """
    path = resolve_model(model, download=download)
    if is_baseline_dir(path):
        if ae:
            raise UsageError("--ae applies to CALM models; this is a token-level baseline")
        return load_baseline(path, device=device, dtype=dtype, tokenizer=tokenizer)
    return load_model(path, device=device, dtype=dtype, ae=ae, tokenizer=tokenizer)
