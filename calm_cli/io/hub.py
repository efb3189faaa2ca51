"""Models by Hugging Face id: `org/name[@revision]` in the standard hub cache, and `calm pull`.

Resolving an id never touches the network: it names a snapshot in the cache that
huggingface_hub manages ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub),
so a pulled model runs offline. Only `pull` (which `--download` calls) downloads, through
huggingface_hub's snapshot_download: its progress bars, its atomic blob writes and its
resumption of a cut transfer with an HTTP range. huggingface_hub is imported inside the
functions that use it because importing it costs about half a second, which help pages and
local models must not pay.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from ..errors import CalmError, UsageError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?$")

# What calm reads besides the weights; the tokenizer's side files are small and keep the
# snapshot usable by the authors' own code.
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# One weights format per model, in the order the loader looks for them (io/checkpoint.py):
# the file itself, and the pattern of its shards when it is an index.
WEIGHTS = (
    ("model.safetensors", None),
    ("model.safetensors.index.json", "model-*.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model-*.bin"),
    ("pytorch_model.bin", None),
)

# The authors' CALM configs name their autoencoder by a path on their training machine
# (`--ae_name_or_path ${WORK_PATH}/checkpoints/autoencoder`); on the hub it is this repo.
AUTHORS_AUTOENCODER = {"cccczshao": "cccczshao/CALM-Autoencoder"}


@dataclass(frozen=True)
class HubId:
    """A model on the hub: `repo` is org/name; `revision` a branch, tag or commit (None: the default branch)."""

    repo: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


def parse_hub_id(spec: str) -> Optional[HubId]:
    """`org/name` or `org/name@revision` as a HubId; None for anything the hub would refuse as an id."""
    match = _HUB_ID.match(spec)
    if match is None or "--" in match["repo"] or ".." in match["repo"] or match["repo"].endswith(".git"):
        return None
    return HubId(match["repo"], match["revision"])


def repo_of(directory: Path) -> Optional[str]:
    """The org/name a cache snapshot folder (…/models--org--name/snapshots/<commit>) belongs to, else None."""
    parent = directory.parent
    if parent.name != "snapshots" or not parent.parent.name.startswith("models--"):
        return None
    return parent.parent.name.removeprefix("models--").replace("--", "/", 1)


def model_files(listing: set[str], folder: str = "") -> tuple[list[str], bool]:
    """The files a model in `folder` of a repo needs, and whether it has weights calm reads.

    Config and tokenizer files, then one weights format (safetensors before .bin, as the
    loader reads them) with its shards: nothing else in the repo is fetched.
    """
    prefix = f"{folder}/" if folder else ""
    files = [prefix + name for name in SMALL_FILES if prefix + name in listing]
    for name, shards in WEIGHTS:
        if prefix + name not in listing:
            continue
        files.append(prefix + name)
        if shards is not None:
            inside = (p for p in listing if p.startswith(prefix) and "/" not in p[len(prefix):])
            files += sorted(p for p in inside if fnmatch.fnmatchcase(p[len(prefix):], shards))
        return files, True
    return files, False


def autoencoder_repo(repo: str, ae_path: Optional[str]) -> Optional[HubId]:
    """Where on the hub the autoencoder named by a hub model's `ae_path` lives, if anywhere.

    `../name` is a sibling repo of the same org; a value that is itself a hub id (training
    with `--ae_name_or_path org/name`) is that repo; any other path was on the training
    machine, which for the authors' org means their published autoencoder.
    """
    if not ae_path:
        return None
    pure = PurePosixPath(ae_path)
    org = repo.split("/")[0]
    if len(pure.parts) == 2 and pure.parts[0] == "..":
        return parse_hub_id(f"{org}/{pure.parts[1]}")
    if not pure.is_absolute() and not ae_path.startswith((".", "~")) and (hub := parse_hub_id(ae_path)) is not None:
        return hub
    known = AUTHORS_AUTOENCODER.get(org)
    return HubId(known) if known else None


def hub_model(hub: HubId, download: bool = False, source: str = "") -> Path:
    """The cached snapshot of `hub`; downloaded first only when `download` (the command line's --download)."""
    found = cached_model(hub)
    if found is None and download:
        found = pull(hub)
    if found is not None:
        if not (found / "config.json").is_file():
            raise UsageError(f"{source}{hub}: no config.json (not a model calm can run)")
        return found
    raise UsageError(f"{source}{hub}: not in the Hugging Face cache (or only in part); run 'calm pull {hub}', or add --download")


def cached_model(hub: HubId) -> Optional[Path]:
    """The snapshot folder of `hub` when every file calm needs is in the cache; no network.

    A snapshot that `pull` (snapshot_download) wrote has its file listing cached, so a pull
    that was cut short counts as missing; one fetched file by file by other tools only needs
    its config.json (a missing weights file is then the loader's error).
    """
    from huggingface_hub import get_cached_repo_tree, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    try:
        listing = {f.path for f in get_cached_repo_tree(hub.repo, revision=hub.revision)}
    except CachedRepoTreeNotFoundError:
        config = try_to_load_from_cache(hub.repo, "config.json", revision=hub.revision)
        return Path(config).parent if isinstance(config, str) else None
    files, _ = model_files(listing)
    try:
        return Path(snapshot_download(hub.repo, revision=hub.revision, local_files_only=True, allow_patterns=files))
    except LocalEntryNotFoundError:
        return None


def cached_autoencoder(directory: Path, ae_path: Optional[str]) -> Optional[Path]:
    """The cached autoencoder of the hub model in `directory` (see `autoencoder_repo`); None when it is not a hub model."""
    repo = repo_of(directory)
    target = autoencoder_repo(repo, ae_path) if repo else None
    if target is None:
        return None
    found = cached_model(target)
    if found is None:
        raise UsageError(f"{repo}: its autoencoder {target} is not in the Hugging Face cache; run 'calm pull {repo}'")
    return found


def pull(hub: HubId, ae: Optional[str] = None) -> Path:
    """Download what `hub` needs into the hub cache and return its snapshot folder.

    Files already complete in the cache are not fetched again, so running pull again finishes
    what a failed one left. The autoencoder comes too when the weights hold none: `ae` (a hub
    id or a directory) if given, else the one config.json's `ae_path` points to.
    """
    from huggingface_hub import HfApi, get_cached_repo_tree, snapshot_download

    with hub_errors(hub):
        revision = HfApi().resolve_revision(hub.repo, revision=hub.revision)
        # Fetching config.json alone first also caches the repo's file listing for the next steps.
        snapshot_download(hub.repo, revision=revision, allow_patterns=["config.json"])
        listing = {f.path for f in get_cached_repo_tree(hub.repo, revision=revision.resolved)}
        files, has_weights = model_files(listing)
        if "config.json" not in listing or not has_weights:
            missing = "config.json" if "config.json" not in listing else "model.safetensors or pytorch_model.bin"
            raise CalmError(f"{hub}: has no {missing}; not a model calm can run")
        snapshot = Path(snapshot_download(hub.repo, revision=revision, allow_patterns=files))
        config = _read_config(snapshot)
        if _needs_autoencoder(config, snapshot):
            ae_path = config["ae_path"] if isinstance(config.get("ae_path"), str) else None
            folder = _folder_in_repo(ae_path, listing)
            if ae is None and folder:
                snapshot_download(hub.repo, revision=revision, allow_patterns=model_files(listing, folder)[0])
            else:
                _pull_autoencoder(hub, ae, ae_path)
    return snapshot


def _folder_in_repo(ae_path: Optional[str], listing: set[str]) -> str:
    """`ae_path` as a folder of the same repo holding a model (the loader resolves it against the snapshot), else ''."""
    if not ae_path:
        return ""
    pure = PurePosixPath(ae_path)
    folder = pure.as_posix()
    inside = not pure.is_absolute() and ".." not in pure.parts and not ae_path.startswith("~")
    return folder if inside and f"{folder}/config.json" in listing else ""


def _pull_autoencoder(hub: HubId, ae: Optional[str], ae_path: Optional[str]) -> None:
    if ae is not None:
        if Path(ae).expanduser().is_dir():
            return
        target = parse_hub_id(ae)
        if target is None:
            raise UsageError(f"--ae {ae}: neither a directory nor a hub id (org/name)")
    else:
        target = autoencoder_repo(hub.repo, ae_path)
        if target is None:
            raise CalmError(
                f"{hub}: the weights hold no autoencoder and config.json's ae_path {ae_path!r} is not on the hub; "
                "pass --ae ORG/NAME or --ae DIR"
            )
    pull(target)


def _read_config(snapshot: Path) -> dict[str, Any]:
    try:
        data = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CalmError(f"{snapshot / 'config.json'}: not a JSON config ({exc})") from None
    return data if isinstance(data, dict) else {}


def _needs_autoencoder(config: dict[str, Any], snapshot: Path) -> bool:
    """A CALM model whose weights lack `ae_model.*`: the authors' CALM files carry the whole autoencoder."""
    architectures = config.get("architectures") or []
    is_calm = "TokenTransformer" not in architectures and ("num_hidden_layers" in config or "EnergyTransformer" in architectures)
    return is_calm and not any(name.startswith("ae_model.") for name in weight_names(snapshot))


def weight_names(directory: Path) -> list[str]:
    """The tensor names in a model folder, read from file headers and indexes (a single .bin is opened memory-mapped)."""
    from huggingface_hub import get_local_safetensors_metadata

    if (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file():
        return list(get_local_safetensors_metadata(directory).weight_map)
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        return list(weight_map) if isinstance(weight_map, dict) else []
    single = directory / "pytorch_model.bin"
    if not single.is_file():
        return []
    import torch

    try:
        return list(torch.load(str(single), map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # an old-format or unreadable pickle: fetch the autoencoder to be safe
        return []


def list_cached() -> list[tuple[str, Path]]:
    """(name, snapshot folder) of every cached hub model revision: `org/name` for the default branch, else `org/name@ref`.

    Without a cache folder this returns before importing huggingface_hub's scanner (0.3 s of `calm models`).
    """
    from huggingface_hub import constants

    if not Path(constants.HF_HUB_CACHE).is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    cache = scan_cache_dir()
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
            refs = sorted(revision.refs)
            name = repo.repo_id if "main" in refs else f"{repo.repo_id}@{refs[0] if refs else revision.commit_hash}"
            found.append((name, Path(revision.snapshot_path)))
    return found


@contextmanager
def hub_errors(hub: HubId) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line messages (exit 2 for a wrong id or revision, 1 for the rest)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    try:
        yield
    except GatedRepoError:
        raise UsageError(f"{hub.repo}: a gated model; accept its terms on the hub, then log in ('hf auth login')") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{hub.repo}: no such model on the hub at {constants.ENDPOINT} (or it is private: log in with 'hf auth login')") from None
    except RevisionNotFoundError:
        raise UsageError(f"{hub}: no such revision of {hub.repo}") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, RevisionResolutionError) as exc:
        if constants.is_offline_mode():
            raise CalmError(f"{hub}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set") from None
        cause = exc.__cause__ or exc
        raise CalmError(f"{hub}: cannot reach the hub at {constants.ENDPOINT} ({type(cause).__name__}: {_first_line(cause)})") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise CalmError(f"{hub}: download failed ({_first_line(exc)}); run 'calm pull {hub}' again to finish it") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
