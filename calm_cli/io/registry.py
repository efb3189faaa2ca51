"""Models by name: the bundled `default` and `baseline`, the subfolders of the user's models directory, and hub ids.

Everything that takes a model (`--model`, $CALM_MODEL, `calm_cli.load`) takes a name, a
directory or a Hugging Face id. A name is looked up here; anything that looks like a path (has
a slash, starts with `.` or `~`, or names an existing directory) stays a path, unless no such
path exists and it reads as `org/name[@revision]`: then it is a hub model (io/hub.py), so a
local name or folder always wins over a hub id. This module reads only config.json and file
sizes, so `calm models` and name resolution do not import torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import UsageError
from .atomic import current_file
from .hub import hub_model, list_cached, parse_hub_id, repo_of

BUNDLED = ("default", "baseline")
ENV_MODEL = "CALM_MODEL"
ModelSpec = Union[str, "os.PathLike[str]", None]


@dataclass(frozen=True)
class ModelEntry:
    """One row of `calm models`: what a name points to, read from config.json and the files' sizes."""

    name: str
    path: Path
    kind: str
    k: Optional[int]
    size_mb: float
    dtype: str


def bundled_dir() -> Path:
    """calm_cli/weights in an installed package; the checkout's weights/ for an editable install."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "weights", package.parent / "weights"):
        if (candidate / "default" / "config.json").is_file():
            return candidate
    return package / "weights"


def user_models_dir() -> Path:
    """$CALM_HOME/models, else $XDG_DATA_HOME/calm/models, else ~/.local/share/calm/models."""
    home = os.environ.get("CALM_HOME")
    if home:
        return Path(home).expanduser() / "models"
    data = os.environ.get("XDG_DATA_HOME")
    root = Path(data) if data and os.path.isabs(data) else Path.home() / ".local" / "share"
    return root / "calm" / "models"


def known_models() -> dict[str, Path]:
    """Name -> directory; a user model of the same name as a bundled one takes its place."""
    found = {name: bundled_dir() / name for name in BUNDLED if (bundled_dir() / name / "config.json").is_file()}
    user = user_models_dir()
    if user.is_dir():
        for sub in sorted(user.iterdir()):
            if current_file(sub, "config.json").is_file():
                found[sub.name] = sub
    return found


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or Path(spec).is_dir()


def resolve_model(spec: ModelSpec = None, download: bool = False) -> Path:
    """The model directory for a name, path or hub id; None means $CALM_MODEL, else `default`.

    A hub id resolves to its snapshot in the Hugging Face cache; it is downloaded only when
    `download` is true. Raises UsageError (exit 2) for an unknown name, a missing directory,
    one without config.json or a hub id that is not in the cache; an error about $CALM_MODEL
    names the variable.
    """
    source = ""
    if spec is None or str(spec) == "":
        env = os.environ.get(ENV_MODEL)
        spec, source = (env, f"{ENV_MODEL}=") if env else ("default", "")
    text = os.fspath(spec)
    if isinstance(spec, str) and not _looks_like_path(text):
        models = known_models()
        if text in models:
            return models[text]
        names = ", ".join(models) or "none"
        raise UsageError(f"{source}{text}: no such model name or directory (known names: {names}; see 'calm models')")
    directory = Path(text).expanduser()
    if not directory.exists() and isinstance(spec, str) and (hub := parse_hub_id(text)) is not None:
        return hub_model(hub, download=download, source=source)
    if not directory.exists():
        raise UsageError(f"{source}{text}: no such model directory")
    if not directory.is_dir():
        raise UsageError(f"{source}{text}: not a directory")
    if not current_file(directory, "config.json").is_file():
        raise UsageError(f"{source}{text}: no config.json (not a model directory)")
    return directory


def model_label(directory: Path) -> str:
    """What to call a model folder: org/name for a Hugging Face cache snapshot (its folder is a commit hash), else the folder's name."""
    return repo_of(directory) or directory.resolve().name


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads(current_file(directory, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_entry(name: str, directory: Path) -> ModelEntry:
    """Kind, K, size on disk and stored dtype of one model directory, without loading it."""
    config = _read_config(directory)
    architectures = config.get("architectures") or []
    if "TokenTransformer" in architectures:
        kind, k = "baseline", 1
    elif "num_hidden_layers" in config or "EnergyTransformer" in architectures:
        kind, k = "calm", config.get("patch_size")
    else:
        kind, k = "autoencoder", config.get("patch_size")
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    return ModelEntry(name, directory, kind, k, size / 1e6, str(config.get("torch_dtype", "?")))


def list_models() -> list[ModelEntry]:
    """Every model `--model` finds by name: bundled ones first, your own, then the CALM models in the Hugging Face cache."""
    entries = [describe_entry(name, path) for name, path in known_models().items()]
    return entries + [describe_entry(name, path) for name, path in list_cached() if _is_calm_family(_read_config(path))]


def _is_calm_family(config: dict[str, Any]) -> bool:
    """A config calm can load (CALM, its autoencoder, or our token baseline), not any other model in the cache."""
    return "patch_size" in config or bool({"EnergyTransformer", "Autoencoder", "TokenTransformer"} & set(config.get("architectures") or []))

