"""Hub ids: ``from_pretrained("org/name", revision=...)`` resolves through huggingface_hub's cache, offline,
for the Python API, the CLI and the bundle; folders keep working; bad names are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unimedvl_core import UniMedVL
from unimedvl_core.io.checkpoint import CheckpointError
from unimedvl_core.io.hub import CONFIG_FILES, HubError, hub_files, is_hub_id, resolve_checkpoint, resolve_config
from unimedvl_core.modeling.config import ConfigError, UniMedVLConfig
from unimedvl_core.tasks.registry import ModelLimits

from .conftest import PARITY_CKPT

REPO = "General-Medical-AI/UniMedVL"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def _snapshot(cache: Path, commit: str, files: list[Path]) -> Path:
    """The Hugging Face cache layout: blobs by content, snapshots/<commit>/<file> linking to them."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in files:
        blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    return repo


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A pre-populated cache holding the parity checkpoint at ``main`` (COMMIT) and, without its weights, at
    the tag ``v0`` (OLD_COMMIT); offline, as on a machine with no network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    files = sorted(PARITY_CKPT.iterdir())
    repo = _snapshot(cache, COMMIT, files)
    _snapshot(cache, OLD_COMMIT, [f for f in files if f.suffix != ".safetensors"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v0").write_text(OLD_COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_the_cache_offline_and_equals_the_folder(hub_cache):
    model = UniMedVL.from_pretrained(REPO, device="cpu", dtype=torch.float32, progress=False)
    folder = UniMedVL.from_pretrained(PARITY_CKPT, device="cpu", dtype=torch.float32, progress=False)
    assert model.name == REPO and model.provenance.weights_file.parent.name == COMMIT
    assert model.provenance.sha256 == folder.provenance.sha256
    for (name, a), (_, b) in zip(model.model.state_dict().items(), folder.model.state_dict().items()):
        assert torch.equal(a, b), name
    by_commit = UniMedVL.from_pretrained(REPO, revision=COMMIT, device="cpu", progress=False)
    assert by_commit.name == f"{REPO}@{COMMIT}"


def test_revision_picks_the_snapshot_and_missing_files_are_clear(hub_cache):
    assert resolve_checkpoint(REPO).name == COMMIT
    assert resolve_checkpoint(REPO, revision="v0").name == OLD_COMMIT
    with pytest.raises(CheckpointError, match="missing weights file"):  # the v0 snapshot has no weights
        UniMedVL.from_pretrained(REPO, revision="v0", progress=False)
    with pytest.raises(HubError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set") as err:
        UniMedVL.from_pretrained("General-Medical-AI/Unknown", progress=False)
    assert "\n" not in str(err.value) and "no folder General-Medical-AI/Unknown here" in str(err.value)
    with pytest.raises(HubError, match="@v9"):
        resolve_checkpoint(REPO, revision="v9")


def test_folders_and_non_ids(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative names must resolve to nothing that exists
    assert resolve_checkpoint(PARITY_CKPT) == PARITY_CKPT
    with pytest.raises(CheckpointError, match="revision='main' applies to Hub ids only"):
        resolve_checkpoint(PARITY_CKPT, revision="main")
    for bad in (tmp_path / "missing", "not a repo", "a/b/c", "../x"):
        with pytest.raises(ConfigError, match="checkpoint folder not found"):
            resolve_checkpoint(bad)
    assert is_hub_id(REPO) and not is_hub_id(str(PARITY_CKPT)) and not is_hub_id("org/../x")
    assert {"ema.safetensors", "model.safetensors", "ae.safetensors", "tokenizer.json", "llm_config.json"} <= \
        set(hub_files("ema"))
    assert "ema.safetensors" not in hub_files("model")


def test_only_the_files_we_read_are_fetched(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_checkpoint(REPO, revision="v1", weights="model") == tmp_path
    assert calls["repo_id"] == REPO and calls["revision"] == "v1"
    assert set(calls["allow_patterns"]) == set(hub_files("model")) and "*" not in calls["allow_patterns"]


def test_cli_and_bundle_take_hub_ids(hub_cache, tmp_path):
    from unimedvl_core.surfaces.bundle import load_network

    assert load_network(REPO).name == REPO
    assert load_network(REPO, revision=COMMIT).provenance.weights_file.parent.name == COMMIT
    out = subprocess.run([sys.executable, "-m", "unimedvl_core.surfaces.cli", "info", "--ckpt", REPO, "--revision",
                          "main", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"UniMedVL({REPO}@main" in out.stdout
    out = subprocess.run([sys.executable, "-m", "unimedvl_core.surfaces.cli", "info", "--ckpt", "org/absent",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in out.stderr


def test_the_map_takes_a_hub_id(hub_cache):
    from unimedvl_core.surfaces.deploy.model import ModelFolderError, choose_model

    choice = choose_model(REPO)
    assert choice.checkpoint.name == COMMIT and not choice.demo
    assert choose_model(f"{REPO}@{COMMIT}").checkpoint == choice.checkpoint
    with pytest.raises(ModelFolderError, match="ema.safetensors or model.safetensors missing"):
        choose_model(f"{REPO}@v0")  # that snapshot has no weights
    with pytest.raises(ModelFolderError, match="not in the Hugging Face cache"):
        choose_model("org/absent")


def test_config_resolution_fetches_no_weights(hub_cache, monkeypatch, capsys):
    """``unimedvl tasks`` and ``batch`` read a Hub checkpoint's limits from its configuration files only."""
    import huggingface_hub

    from unimedvl_core.surfaces.cli import main

    config_only = "c" * 40
    repo = _snapshot(hub_cache, config_only, [f for f in sorted(PARITY_CKPT.iterdir()) if f.name in CONFIG_FILES])
    (repo / "refs" / "cfg").write_text(config_only)
    asked, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: asked.append(k["allow_patterns"]) or real(*a, **k))
    folder = resolve_config(REPO, revision="cfg")
    assert folder.name == config_only and not list(folder.glob("*.safetensors"))
    assert sorted(asked[-1]) == sorted(CONFIG_FILES)  # no weights, tokenizer or VAE requested
    assert main(["tasks", "--ckpt", REPO, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["limits"]
    assert shown == ModelLimits.of(UniMedVLConfig.from_dir(PARITY_CKPT)).describe()
    assert main(["tasks", "--ckpt", "General-Medical-AI/Unknown"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not in the Hugging Face cache" in err and len(err.splitlines()) == 1
