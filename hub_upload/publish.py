"""`push`: build the Hub folder, verify it in a fresh process, check the remote repo, upload.

Order: token (fails fast) -> remote checks (reachable, no other model_type in the repo) -> build -> verify ->
create_repo / branch -> upload_folder. A dry run builds and verifies only: no token, no network.
The token is only ever handed to `HfApi`; every Hub error message is printed with it redacted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging as transformers_logging

from .card import build_model_card, provenance_for, read_eval_results
from .folder import (
    DEFAULT_MAX_SHARD_SIZE,
    ShippedFile,
    check_shippable,
    format_size,
    load_model_dir,
    parse_shard_size,
    write_hub_folder,
)
from .verify import VerifyReport, verify_in_fresh_process

HUB_URL = "https://huggingface.co"
# Remote weight files a new upload replaces wholesale (files uploaded in the same commit are kept): a stale
# `model.safetensors` left beside a new sharded index would be what transformers loads. Other files are left alone.
REPLACED_REMOTE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


class HubUploadError(RuntimeError):
    """A push that cannot go ahead; the message says what to do."""


@dataclass
class PushReport:
    repo_id: str
    revision: str
    folder: Path
    files: list[ShippedFile]
    verification: VerifyReport | None
    commit_url: str | None  # None for a dry run


def resolve_token(token_env: str | None = None) -> str:
    """The token from `$token_env` if named, else huggingface_hub's (HF_TOKEN or `hf auth login`)."""
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise HubUploadError(
                f"--token-env {token_env}: the environment variable {token_env} is not set or empty. Put a Hugging "
                "Face write token there, or use --dry-run to build and verify without uploading."
            )
        return token
    token = get_token()
    if not token:
        raise HubUploadError(
            "No Hugging Face token: set HF_TOKEN to a write token (https://huggingface.co/settings/tokens), run "
            "`hf auth login`, or name another variable with --token-env. Use --dry-run to build and verify "
            "without uploading."
        )
    return token


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "no connection": OS-level, huggingface_hub's offline mode, and its HTTP client's."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OfflineModeIsEnabled]
    for module_name in ("httpx2", "httpx", "requests"):  # whichever client this huggingface_hub version uses
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):  # httpx.Timeout is a settings class: skip it
            error = getattr(module, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                errors.append(error)
    return tuple(errors)


@contextmanager
def hub_errors(step: str, repo_id: str, token: str) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions during `step` into a HubUploadError a user can act on."""
    try:
        yield
    except HubUploadError:
        raise
    except (*_transport_errors(), LocalEntryNotFoundError) as err:
        raise HubUploadError(
            f"The Hugging Face Hub is unreachable ({step}: {type(err).__name__}: {redact(str(err), token)}). Check "
            "your network or proxy (HF_ENDPOINT, HTTPS_PROXY) and that HF_HUB_OFFLINE is not set; --dry-run builds "
            "and verifies without the Hub."
        ) from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            reason = "the Hub rejected the token (401 Unauthorized): check it is valid and not expired"
        elif status == 403:
            reason = f"the token has no write access to {repo_id} (403 Forbidden): use a write token for that namespace"
        else:
            reason = f"the Hub answered {status}: {redact(str(err), token)}"
        raise HubUploadError(f"{step} failed: {reason}") from None


def redact(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


@dataclass
class RemoteRepo:
    exists: bool
    model_type: str | None = None  # from the repo's config.json; None when it has none


def inspect_remote(api: HfApi, repo_id: str, revision: str) -> RemoteRepo:
    """Whether the repo exists and which model_type its config.json declares (at `revision`, else main)."""
    if not api.repo_exists(repo_id, repo_type="model"):
        return RemoteRepo(exists=False)
    for ref in dict.fromkeys([revision, "main"]):
        try:
            path = api.hf_hub_download(repo_id, "config.json", revision=ref)
        except RevisionNotFoundError:
            continue  # a new branch: it will start from main
        except LocalEntryNotFoundError:
            raise  # no connection, not "no file"
        except (EntryNotFoundError, RepositoryNotFoundError):
            return RemoteRepo(exists=True)
        try:
            model_type = json.loads(Path(path).read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            model_type = "<unreadable config.json>"
        return RemoteRepo(exists=True, model_type=model_type)
    return RemoteRepo(exists=True)


def check_remote_model_type(remote: RemoteRepo, repo_id: str, revision: str) -> None:
    if remote.model_type not in (None, "llama_hybrid"):
        raise HubUploadError(
            f"{repo_id} already holds a {remote.model_type!r} model (its config.json, revision {revision} or main); "
            "pushing a LlamaHybrid model there would mix two models in one repo. Choose another --repo-id, or "
            "delete that repo first if it is really yours to replace."
        )


def push(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str = "main",
    dry_run: bool = False,
    staging_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    token_env: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> PushReport:
    """Build, verify and (unless `dry_run`) upload MODEL_DIR as a Hub repo loadable with `trust_remote_code=True`."""
    validate_repo_id(repo_id)
    shard_bytes = parse_shard_size(max_shard_size)
    token = None if dry_run else resolve_token(token_env)
    api, remote = None, RemoteRepo(exists=False)
    if token is not None:
        api = HfApi(token=token)
        with hub_errors("checking the repository", repo_id, token):
            remote = inspect_remote(api, repo_id, revision)
        check_remote_model_type(remote, repo_id, revision)

    temporary = staging_dir is None
    folder = Path(tempfile.mkdtemp(prefix="llama-hybrid-push-")) / "hub-folder" if temporary else Path(staging_dir)
    try:
        with _quiet_progress_bars():  # loading/saving bars would bury the report; upload bars stay
            provenance = provenance_for(model_dir, base_model=base_model, license=license)
            model, tokenizer, files = _build(model_dir, repo_id, folder, overwrite, shard_bytes, provenance, log)
            verification = _verify(folder, files, model, tokenizer, repo_id, token, log) if verify else None
        if dry_run:
            _log_dry_run(log, repo_id, revision, private, folder, files, temporary)
            return PushReport(repo_id, revision, folder, files, verification, None)
        commit_url = _upload(api, token, repo_id, revision, private, folder, files, remote.exists, log)
        return PushReport(repo_id, revision, folder, files, verification, commit_url)
    finally:
        if temporary:
            shutil.rmtree(folder.parent, ignore_errors=True)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _build(model_dir, repo_id, folder, overwrite, max_shard_size, provenance, log):
    model, tokenizer = load_model_dir(model_dir)
    has_chat_template = tokenizer.chat_template is not None
    readme = build_model_card(model, repo_id, provenance, read_eval_results(model_dir), has_chat_template)
    write_hub_folder(model, tokenizer, str(readme), folder, max_shard_size=max_shard_size, overwrite=overwrite)
    files = check_shippable(folder)
    log(f"Built {folder}: {len(files)} files, {_total(files)}; only safetensors and text files.")
    if provenance.license == "unknown":
        log("  note: the card says the license is unknown; pass --license (e.g. apache-2.0) to state it.")
    return model, tokenizer, files


def _verify(folder, files, model, tokenizer, repo_id, token, log) -> VerifyReport:
    log("Verifying in a fresh Python process where llama_hybrid and modeling_llama_hybrid cannot be imported ...")
    secrets = (token,) if token else ()
    report = verify_in_fresh_process(folder, files, model, tokenizer, repo_id=repo_id, secrets=secrets)
    log(
        f"  from the folder with trust_remote_code=True: max |logit diff| {report.max_abs_logit_diff:.2g}, "
        f"greedy generate matches ({report.generated_text[:60]!r})"
    )
    log(
        "  by repo id from an offline Hub cache (HF_HUB_OFFLINE=1; AutoConfig, AutoTokenizer, "
        f"AutoModelForCausalLM, pipeline): max |logit diff| {report.hub_cache_max_abs_logit_diff:.2g}"
    )
    log(f"  verified in {report.seconds:.1f} s")
    return report


def _total(files: list[ShippedFile]) -> str:
    return format_size(sum(f.size for f in files))


def _file_lines(files: list[ShippedFile]) -> list[str]:
    width = max(len(f"{f.size:,}") for f in files)
    return [f"  {f.size:>{width},} B  {format_size(f.size):>9}  {f.name}" for f in files]


def _log_dry_run(log, repo_id, revision, private, folder, files, temporary) -> None:
    visibility = "private" if private else "public"
    log(
        f"Dry run: would upload {len(files)} files ({_total(files)}) to {HUB_URL}/{repo_id} ({visibility}), revision {revision}:"
    )
    for line in _file_lines(files):
        log(line)
    log(f"  replacing remote weight files ({' '.join(REPLACED_REMOTE_PATTERNS)}) that this upload does not contain.")
    log("Skipped the remote checks (token, Hub reachability, existing repo and its model_type): nothing was sent.")
    if temporary:
        log("It was built in a temporary folder, now removed; pass --staging-dir DIR to keep it.")
    else:
        log(f"The folder is kept at {folder}.")


def _upload(api, token, repo_id, revision, private, folder, files, existed, log) -> str:
    with hub_errors("creating the repository", repo_id, token):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if existed and private:
        log(f"  note: {repo_id} already existed; --private does not change the visibility of an existing repo.")
    if revision != "main":
        with hub_errors(f"creating branch {revision}", repo_id, token):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    log(f"Uploading {len(files)} files ({_total(files)}) to {HUB_URL}/{repo_id}, revision {revision} ...")
    with hub_errors("uploading", repo_id, token):
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            revision=revision,
            commit_message="Upload LlamaHybrid model (llama-hybrid push)",
            allow_patterns=[f.name for f in files],  # exactly the files checked above, nothing added since
            delete_patterns=REPLACED_REMOTE_PATTERNS,
        )
    commit_url = getattr(commit, "commit_url", None) or f"{HUB_URL}/{repo_id}"
    log(f"Uploaded: {commit_url}")
    return commit_url


__all__ = ["HubUploadError", "PushReport", "push", "resolve_token"]
