"""Tests for llama_hybrid.hub_upload.publish and the `llama-hybrid push` command: the dry run's report, the upload of
exactly the checked files, the token never leaking, and the remote error paths (no token, unreachable Hub, a repo of
another model type, a rejected token, a new branch), with HfApi mocked (no network); the default model's dry run
(slow). Fixtures: conftest.py / hub_support.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hub_support import FAKE_TOKEN, REPO_ID, run_cli
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalEntryNotFoundError, Response, RevisionNotFoundError

from llama_hybrid.hub_upload import publish
from llama_hybrid.hub_upload.verify import check_environment


def test_dry_run_lists_every_file_with_its_size_and_sends_nothing(hub_dry_run):
    for path in hub_dry_run.folder.iterdir():
        assert f"{path.stat().st_size:,} B" in hub_dry_run.out and f"  {path.name}\n" in hub_dry_run.out
    assert f"https://huggingface.co/{REPO_ID}" in hub_dry_run.out and "revision main" in hub_dry_run.out
    assert "Skipped the remote checks" in hub_dry_run.out and "nothing was sent" in hub_dry_run.out
    assert "max |logit diff| 0" in hub_dry_run.out and "offline Hub cache" in hub_dry_run.out


def test_the_fresh_process_runs_with_this_process_threads(tmp_path):
    """The check compares logits to the last bit only if both processes sum in the same order: torch's thread count
    (a pytest worker where a study set one thread got 8.9e-08 against a fresh process on two)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        env = check_environment(tmp_path)
    finally:
        torch.set_num_threads(threads)
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "1"


# --- push: token and remote checks (HfApi mocked; nothing reaches the network) -------------------------------------


def fake_api(tmp_path, remote_config: dict | None = None, exists: bool = False) -> mock.MagicMock:
    api = mock.MagicMock(name="HfApi()")
    api.repo_exists.return_value = exists
    if remote_config is not None:
        path = tmp_path / "remote_config.json"
        path.write_text(json.dumps(remote_config))
        api.hf_hub_download.return_value = str(path)
    api.upload_folder.return_value = SimpleNamespace(commit_url=f"https://huggingface.co/{REPO_ID}/commit/abc123")
    return api


def test_push_uploads_exactly_the_checked_files_and_never_leaks_the_token(hub_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_HUB_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path)
    staging = tmp_path / "staging"
    with mock.patch.object(publish, "HfApi", return_value=api) as hf_api:
        code, out, err = run_cli(
            "push", str(hub_model_dir), "--repo-id", REPO_ID, "--token-env", "MY_HUB_TOKEN", "--private",
            "--revision", "dev", "--staging-dir", str(staging),
        )  # fmt: skip
    assert code == 0, err
    hf_api.assert_called_once_with(token=FAKE_TOKEN)
    api.create_repo.assert_called_once_with(REPO_ID, repo_type="model", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(REPO_ID, branch="dev", repo_type="model", exist_ok=True)
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == REPO_ID and upload["revision"] == "dev" and Path(upload["folder_path"]) == staging
    assert sorted(upload["allow_patterns"]) == sorted(p.name for p in staging.iterdir())
    assert "https://huggingface.co/tester/tiny-llama-hybrid/commit/abc123" in out
    assert FAKE_TOKEN not in out + err
    for path in staging.iterdir():
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path.name


def test_no_token_fails_before_building(hub_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(publish, "get_token", lambda: None)
    staging = tmp_path / "staging"
    code, _, err = run_cli("push", str(hub_model_dir), "--repo-id", REPO_ID, "--staging-dir", str(staging))
    assert code == 2 and "No Hugging Face token" in err and "--dry-run" in err
    assert not staging.exists()
    code, _, err = run_cli("push", str(hub_model_dir), "--repo-id", REPO_ID, "--token-env", "UNSET_TOKEN_VAR")
    assert code == 2 and "UNSET_TOKEN_VAR is not set" in err


def _connect_error(message: str) -> Exception:
    client = sys.modules[Response.__module__.split(".")[0]]  # the HTTP client this huggingface_hub uses
    return client.ConnectError(message)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError(f"Failed to establish a new connection (token {FAKE_TOKEN})"),
        _connect_error("[Errno -3] Temporary failure in name resolution"),
    ],
    ids=["ConnectionError", "client.ConnectError"],
)
def test_unreachable_hub_is_reported_without_the_token(hub_model_dir, tmp_path, monkeypatch, error):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path)
    api.repo_exists.side_effect = error
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, out, err = run_cli("push", str(hub_model_dir), "--repo-id", REPO_ID)
    assert code == 2 and "Hugging Face Hub is unreachable" in err
    assert FAKE_TOKEN not in out + err
    api.upload_folder.assert_not_called()


def test_unreachable_while_reading_the_remote_config(hub_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path, exists=True)
    api.hf_hub_download.side_effect = LocalEntryNotFoundError("An error happened while trying to locate the file")
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, _, err = run_cli("push", str(hub_model_dir), "--repo-id", REPO_ID)
    assert code == 2 and "unreachable" in err


def test_repo_holding_another_model_type_is_refused(hub_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path, remote_config={"model_type": "llama"}, exists=True)
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, _, err = run_cli("push", str(hub_model_dir), "--repo-id", REPO_ID)
    assert code == 2 and f"{REPO_ID} already holds a 'llama' model" in err
    api.create_repo.assert_not_called()
    api.upload_folder.assert_not_called()


def test_rejected_token_is_explained(hub_model_dir, tmp_path, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path)
    request = sys.modules[Response.__module__.split(".")[0]].Request("GET", "https://huggingface.co/api/models/x")
    api.repo_exists.side_effect = HfHubHTTPError("401 Unauthorized", response=Response(401, request=request))
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, _, err = run_cli("push", str(hub_model_dir), "--repo-id", REPO_ID)
    assert code == 2 and "rejected the token" in err


def test_new_branch_is_checked_against_main(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama_hybrid"}))
    request = sys.modules[Response.__module__.split(".")[0]].Request("GET", "https://huggingface.co/x")
    api = mock.MagicMock()
    api.repo_exists.return_value = True
    api.hf_hub_download.side_effect = [
        RevisionNotFoundError("no branch", response=Response(404, request=request)),
        str(path),
    ]
    remote = publish.inspect_remote(api, REPO_ID, "new-branch")
    assert remote == publish.RemoteRepo(exists=True, model_type="llama_hybrid")
    assert [c.kwargs["revision"] for c in api.hf_hub_download.call_args_list] == ["new-branch", "main"]


def test_bad_repo_id_and_shard_size_are_clear(hub_model_dir):
    code, _, err = run_cli("push", str(hub_model_dir), "--repo-id", "a/b/c", "--dry-run")
    assert code == 2 and "namespace/repo_name" in err
    code, _, err = run_cli("push", str(hub_model_dir), "--repo-id", REPO_ID, "--dry-run", "--max-shard-size", "5TB")
    assert code == 2 and "--max-shard-size" in err


# --- the real default model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_of_the_default_model(default_model_dir, tmp_path):
    staging = tmp_path / "hub"
    code, out, err = run_cli(
        "push", str(default_model_dir), "--repo-id", "your-name/SmolLM2-135M-llama-hybrid", "--dry-run",
        "--staging-dir", str(staging),
    )  # fmt: skip
    assert code == 0, err
    assert "greedy generate matches" in out and "nothing was sent" in out
    meta = ModelCard.load(staging / "README.md").data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "quantization_config" not in json.loads((staging / "config.json").read_text())
