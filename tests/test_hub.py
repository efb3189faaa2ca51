"""Models by Hugging Face id, without a network.

Resolution runs against a hub cache laid out by hand in a temporary folder (refs,
snapshots, blobs, as huggingface_hub writes it). `calm pull` runs against `HubServer`, a
local HTTP server that answers the calls huggingface_hub 2.4 makes for snapshot_download
and hf_hub_download (revision info, tree listing, `resolve/{rev}/{file}` with HEAD, GET and
ranges), serving the authors'-layout fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import pytest
import torch
from helpers import run_calm
from safetensors.torch import load_file, save_file

import calm_cli
from calm_cli.errors import CalmError, UsageError
from calm_cli.io import hub as hubmod
from calm_cli.io.checkpoint import load_model
from calm_cli.io.registry import list_models, model_label, resolve_model

FIXTURES = Path(__file__).parent / "fixtures" / "official-tiny"
AE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def fixture_files(folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((FIXTURES / folder).iterdir())}


# ---- a hub cache laid out by hand ---------------------------------------------------------------


def lay_out(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    """One revision of `repo` in huggingface_hub's cache layout: blobs by hash, snapshot links to them, refs naming the commit."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that huggingface_hub (already imported, so past reading its environment) uses in this process."""
    from huggingface_hub import constants

    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("CALM_HOME", str(tmp_path / "calm"))
    return folder


def test_hub_ids_parse_and_paths_do_not() -> None:
    assert hubmod.parse_hub_id("cccczshao/CALM-M") == hubmod.HubId("cccczshao/CALM-M")
    assert hubmod.parse_hub_id("org/name@v1.0") == hubmod.HubId("org/name", "v1.0")
    for path in ("./org/name", "/abs/path", "~/models/x", "a/b/c", "org--x/name", "org/name@", "default"):
        assert hubmod.parse_hub_id(path) is None, path


def test_revision_resolves_through_refs_and_commits(cache: Path) -> None:
    files = fixture_files("calm")
    main, tagged = commit_of("main"), commit_of("v1")
    main_dir = lay_out(cache, "org/tiny", main, files)
    tagged_dir = lay_out(cache, "org/tiny", tagged, {**files, "config.json": files["config.json"].replace(b'"num_samples": 8', b'"num_samples": 4')}, ("v1",))
    assert resolve_model("org/tiny") == main_dir
    assert resolve_model("org/tiny@main") == main_dir
    assert resolve_model("org/tiny@v1") == tagged_dir
    assert resolve_model(f"org/tiny@{tagged}") == tagged_dir
    assert load_model("org/tiny@v1").config.num_samples == 4
    assert calm_cli.load("org/tiny").config.num_samples == 8  # the public API takes hub ids too
    assert model_label(main_dir) == "org/tiny" and model_label(FIXTURES / "calm") == "calm"  # what `calm serve` calls it
    with pytest.raises(UsageError, match=r"org/tiny@v2: not in the Hugging Face cache .*calm pull org/tiny@v2"):
        resolve_model("org/tiny@v2")


def test_local_names_and_paths_win_over_hub_ids(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lay_out(cache, "org/tiny", commit_of("main"), fixture_files("calm"))
    local = tmp_path / "work" / "org" / "tiny"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model("org/tiny") == Path("org/tiny")
    assert resolve_model("default").parent.name == "weights"  # a one-word name is never a hub id


def test_offline_mode_resolves_from_the_cache_and_misses_say_pull(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = lay_out(cache, "org/tiny", commit_of("main"), fixture_files("calm"))
    assert resolve_model("org/tiny") == snapshot
    with pytest.raises(UsageError, match=r"calm pull org/other"):
        resolve_model("org/other")
    with pytest.raises(CalmError, match="HF_HUB_OFFLINE is set"):
        resolve_model("org/other", download=True)


def test_hub_models_are_listed_beside_local_ones(cache: Path) -> None:
    lay_out(cache, "org/tiny", commit_of("main"), fixture_files("calm"))
    lay_out(cache, "org/tiny", commit_of("v1"), fixture_files("calm"), ("v1",))
    lay_out(cache, "other/bert", commit_of("bert"), {"config.json": b'{"architectures": ["BertModel"]}'})
    names = [e.name for e in list_models()]
    assert names[:2] == ["default", "baseline"]
    assert "org/tiny" in names and "org/tiny@v1" in names and "other/bert" not in names
    entry = next(e for e in list_models() if e.name == "org/tiny")
    assert (entry.kind, entry.k) == ("calm", 4) and entry.size_mb == pytest.approx(1.97, abs=0.01)


def test_autoencoder_paths_map_to_hub_repos() -> None:
    assert hubmod.autoencoder_repo("cccczshao/CALM-M", "/mnt/work/checkpoints/autoencoder") == hubmod.HubId("cccczshao/CALM-Autoencoder")
    assert hubmod.autoencoder_repo("org/calm", "../my-ae") == hubmod.HubId("org/my-ae")
    assert hubmod.autoencoder_repo("org/calm", "org2/ae") == hubmod.HubId("org2/ae")
    assert hubmod.autoencoder_repo("org/calm", "/home/someone/ae") is None


def test_a_cached_model_without_its_autoencoder_uses_the_cached_sibling(cache: Path, tmp_path: Path) -> None:
    """The loader finds the autoencoder that `ae_path` (a path on another machine) points to in the cache."""
    lay_out(cache, "cccczshao/CALM-Autoencoder", commit_of("ae"), {n: (FIXTURES / "autoencoder" / n).read_bytes() for n in AE_FILES})
    lay_out(cache, "cccczshao/CALM-T", commit_of("t"), without_autoencoder(tmp_path))
    model = load_model("cccczshao/CALM-T")
    reference = load_model(FIXTURES / "calm")
    assert_same_weights(model, reference)
    local = tmp_path / "elsewhere"
    local.mkdir()
    for name, data in without_autoencoder(tmp_path).items():
        (local / name).write_bytes(data.replace(b"/mnt/train/checkpoints/autoencoder", b"/nowhere"))
    with pytest.raises(CalmError, match="autoencoder directory /nowhere not found"):
        load_model(local)  # a local folder never looks in the hub cache by itself
    assert_same_weights(load_model(local, ae="cccczshao/CALM-Autoencoder"), reference)  # --ae takes a hub id
    with pytest.raises(UsageError, match="autoencoder org/none: not in the Hugging Face cache; run 'calm pull org/none'"):
        load_model(local, ae="org/none")


def without_autoencoder(tmp_path: Path) -> dict[str, bytes]:
    """The fixture CALM saved without `ae_model.*`, its ae_path the authors' kind: a folder on their machine."""
    tensors = {k: v for k, v in load_file(str(FIXTURES / "calm" / "model.safetensors")).items() if not k.startswith("ae_model.")}
    path = tmp_path / "no-ae.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((FIXTURES / "calm" / "config.json").read_text())
    config["ae_path"] = "/mnt/train/checkpoints/autoencoder"
    files = fixture_files("calm")
    return {**files, "model.safetensors": path.read_bytes(), "config.json": json.dumps(config, indent=2).encode()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- a local server that answers like the hub ----------------------------------------------------


class HubServer:
    """The hub's file API for a few repos, on 127.0.0.1; `cut` files send half their bytes on the first full GET, `broken` ones fail."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = {repo: (commit_of(repo), files) for repo, files in repos.items()}
        self.cut: set[str] = set()
        self.broken: set[str] = set()
        self.log: list[tuple[str, str, Optional[str]]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self, name: str) -> list[Optional[str]]:
        """The Range header of each GET of a file named `name`."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith(f"/{name}") and "/resolve/" in path]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.log.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    return self._api(f"{parts[2]}/{parts[3]}", parts[4:])
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
                self._error(404, "RepoNotFound")

            def _repo(self, repo: str, revision: str) -> Optional[tuple[str, dict[str, bytes]]]:
                if repo not in hub.repos:
                    self._error(404, "RepoNotFound")
                    return None
                commit, files = hub.repos[repo]
                if revision not in ("main", commit):
                    self._error(404, "RevisionNotFound")
                    return None
                return commit, files

            def _api(self, repo: str, rest: list[str]) -> None:
                revision = rest[1] if rest[:1] in (["revision"], ["tree"]) and len(rest) > 1 else "main"
                found = self._repo(repo, revision)
                if found is None:
                    return
                commit, files = found
                if rest[:1] == ["tree"]:
                    entries = [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                         **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}} if len(data) > 100_000 else {})}
                        for name, data in files.items()
                    ]
                    return self._json(entries, commit)
                self._json({"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in files]}, commit)

            def _file(self, repo: str, revision: str, name: str, body: bool) -> None:
                found = self._repo(repo, revision)
                if found is None:
                    return
                commit, files = found
                if name not in files:
                    return self._error(404, "EntryNotFound", commit)
                data = files[name]
                if body and name in hub.broken:
                    return self._error(500, None, commit)
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if body and self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if name in hub.cut and not start:
                    hub.cut.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def _json(self, value: object, commit: str) -> None:
                payload = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-Repo-Commit", commit)
                self.end_headers()
                self.wfile.write(payload)

            def _error(self, status: int, code: Optional[str], commit: Optional[str] = None) -> None:
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HubServer, dict[str, str], Path]]:
    """A server with the authors' tiny CALM (safetensors and .bin), their autoencoder, and a CALM without one; the env for `calm`.

    The cache is $HF_HOME/hub: the variables that would override it, or a token, are not passed on.
    """
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    repos = {
        "org/tiny": fixture_files("calm"),
        "org/tiny-bin": fixture_files("calm-bin"),
        "cccczshao/CALM-Autoencoder": fixture_files("autoencoder"),
        "cccczshao/CALM-T": without_autoencoder(tmp_path),
        "org/with-ae": {
            **{n: d.replace(b"/mnt/train/checkpoints/autoencoder", b"./autoencoder") for n, d in without_autoencoder(tmp_path).items()},
            **{f"autoencoder/{n}": d for n, d in fixture_files("autoencoder").items()},
        },
    }
    repos["org/tiny"]["README.md"] = b"# tiny\n"
    repos["org/tiny"]["pytorch_model.bin"] = (FIXTURES / "calm-bin" / "pytorch_model.bin").read_bytes()
    home = tmp_path / "hf"
    with HubServer(repos) as server:
        env = {
            "HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "CALM_HOME": str(tmp_path / "calm"), "CALM_THREADS": "1",
        }
        yield server, env, home / "hub"


def snapshot_of(cache: Path, repo: str) -> Path:
    storage = cache / f"models--{repo.replace('/', '--')}"
    return storage / "snapshots" / (storage / "refs" / "main").read_text()


def pull_in_small_chunks(spec: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`calm pull` with huggingface_hub reading 64 KiB at a time instead of 10 MiB, so that a cut 2 MB file has whole chunks to keep."""
    script = (
        "import sys; from huggingface_hub import constants; constants.DOWNLOAD_CHUNK_SIZE = 65536; "
        "from calm_cli.cli.main import main; sys.argv = ['calm', 'pull', sys.argv[1]]; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", script, spec], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_pull_fetches_only_what_the_model_needs_and_resumes_a_cut_file(hub_env) -> None:
    server, env, cache = hub_env
    server.cut.add("model.safetensors")
    result = pull_in_small_chunks("org/tiny", env)
    assert result.returncode == 0, result.stderr
    snapshot = snapshot_of(cache, "org/tiny")
    assert result.stdout.strip() == str(snapshot)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in (FIXTURES / "calm").iterdir())  # no README, no .bin
    ranges = server.gets("model.safetensors")
    size = (FIXTURES / "calm" / "model.safetensors").stat().st_size
    assert len(ranges) == 2 and ranges[0] is None  # cut midway, then resumed from the last whole chunk it kept
    assert ranges[1] is not None and 0 < int(ranges[1].removeprefix("bytes=").removesuffix("-")) <= size // 2
    assert not server.gets("cccczshao/CALM-Autoencoder")  # the weights hold the autoencoder
    for f in (FIXTURES / "calm").iterdir():
        assert (snapshot / f.name).read_bytes() == f.read_bytes(), f.name
    assert_same_weights(load_model(snapshot), load_model(FIXTURES / "calm"))
    listed = run_calm("models", "--json", env={**env, "HF_HUB_OFFLINE": "1"})
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"name": "org/tiny", "path": str(snapshot), "kind": "calm", "K": 4} == {k: v for k, v in rows[-1].items() if k in ("name", "path", "kind", "K")}


def test_a_failed_pull_is_finished_by_the_next_one(hub_env) -> None:
    server, env, cache = hub_env
    server.broken.add("model.safetensors")
    failed = run_calm("pull", "org/tiny", env=env)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("error: org/tiny: download failed (") and last.endswith("run 'calm pull org/tiny' again to finish it")
    assert "Traceback" not in failed.stderr
    run = run_calm("generate", "-m", "org/tiny", "Hi", "-n", "4", env={**env, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and "error: org/tiny: not in the Hugging Face cache (or only in part); run 'calm pull org/tiny'" in run.stderr
    server.broken.clear()
    before = len(server.gets("tokenizer.json"))
    done = run_calm("pull", "org/tiny", env=env)
    assert done.returncode == 0, done.stderr
    assert len(server.gets("tokenizer.json")) == before  # complete files are not fetched again
    assert len(server.gets("model.safetensors")) == 2
    assert_same_weights(load_model(snapshot_of(cache, "org/tiny")), load_model(FIXTURES / "calm"))


def test_pull_fetches_the_autoencoder_that_ae_path_points_to_and_download_runs_it(hub_env) -> None:
    server, env, cache = hub_env
    uncached = run_calm("generate", "-m", "cccczshao/CALM-T", "Hi", "-n", "4", "--temp", "1", "--seed", "1", env=env)
    assert uncached.returncode == 2 and uncached.stderr.strip() == (
        "error: cccczshao/CALM-T: not in the Hugging Face cache (or only in part); run 'calm pull cccczshao/CALM-T', or add --download"
    )
    assert not server.log  # nothing was asked of the hub without --download
    result = run_calm("generate", "-m", "cccczshao/CALM-T", "Hi", "-n", "4", "--temp", "1", "--seed", "1", "--download", env=env)
    assert result.returncode == 0, result.stderr
    assert server.gets("model.safetensors") and any("CALM-Autoencoder" in p for _, p, _ in server.log)
    reference = run_calm("generate", "-m", str(FIXTURES / "calm"), "Hi", "-n", "4", "--temp", "1", "--seed", "1", env=env)
    assert result.stdout == reference.stdout
    ae = snapshot_of(cache, "cccczshao/CALM-Autoencoder")
    assert sorted(p.name for p in ae.iterdir()) == sorted(AE_FILES)


def test_pull_fetches_an_autoencoder_folder_of_the_same_repo(hub_env) -> None:
    server, env, cache = hub_env
    result = run_calm("pull", "org/with-ae", env=env)
    assert result.returncode == 0, result.stderr
    snapshot = snapshot_of(cache, "org/with-ae")
    assert sorted(p.name for p in (snapshot / "autoencoder").iterdir()) == sorted(p.name for p in (FIXTURES / "autoencoder").iterdir())
    assert not any("CALM-Autoencoder" in p for _, p, _ in server.log)
    assert_same_weights(load_model(snapshot), load_model(FIXTURES / "calm"))


def test_pull_takes_the_bin_weights_when_there_is_no_safetensors(hub_env, tmp_path: Path) -> None:
    server, env, _ = hub_env
    cache = tmp_path / "elsewhere"
    result = run_calm("pull", "org/tiny-bin", env={**env, "HF_HUB_CACHE": str(cache)})  # HF_HUB_CACHE beats HF_HOME
    assert result.returncode == 0, result.stderr
    assert "pytorch_model.bin" in {p.name for p in snapshot_of(cache, "org/tiny-bin").iterdir()}
    assert not any("CALM-Autoencoder" in p for _, p, _ in server.log)  # the .bin holds ae_model.*


@pytest.mark.parametrize(
    ("args", "extra_env", "code", "message"),
    [
        (("pull", "org/missing"), {}, 2, "error: org/missing: no such model on the hub at "),
        (("pull", "org/tiny@v9"), {}, 2, "error: org/tiny@v9: no such revision of org/tiny"),
        (("pull", "org/tiny"), {"HF_HUB_OFFLINE": "1"}, 1, "error: org/tiny: not in the Hugging Face cache, and HF_HUB_OFFLINE is set"),
        (("pull", "not-an-id"), {}, 2, "error: not-an-id: not a Hugging Face id (org/name or org/name@revision)"),
    ],
)
def test_pull_errors_are_one_line(hub_env, args: tuple[str, ...], extra_env: dict[str, str], code: int, message: str) -> None:
    _, env, _ = hub_env
    result = run_calm(*args, env={**env, **extra_env})
    assert result.returncode == code
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
