"""Prove a Hub folder works for someone without llama-hybrid: load it in a fresh process with the package hidden,
from the folder and by repo id from an offline Hub cache, and compare logits and greedy tokens with this process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from .folder import ShippedFile

VERIFY_PROMPT = "What is the capital of France?"
GENERATE_TOKENS = 8
# Same code, same weights, same machine: fp32 logits agree to rounding; half precision gets a looser bound.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 2e-2
CHECK_SCRIPT = Path(__file__).with_name("fresh_process_check.py")
# Variables that may carry a Hub token: never handed to the check, which needs no network anyway.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")


class VerificationError(RuntimeError):
    """The folder does not load or does not reproduce the model in a fresh process."""


@dataclass
class VerifyReport:
    max_abs_logit_diff: float
    generated_text: str
    hub_cache_max_abs_logit_diff: float | None  # None when the repo-id path was not checked
    seconds: float


def reference_outputs(model, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Logits and greedy tokens of this process's model on a fixed prompt (chat-formatted when it has a template)."""
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": VERIFY_PROMPT}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(VERIFY_PROMPT, return_tensors="pt")
    inputs = {name: inputs[name].to(model.device) for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        generated = model.generate(**inputs, max_new_tokens=GENERATE_TOKENS, do_sample=False)
    return {
        **{name: tensor.cpu().contiguous() for name, tensor in inputs.items()},
        "logits": logits.cpu().contiguous(),
        "generated": generated[:, inputs["input_ids"].shape[1] :].cpu().contiguous(),
    }


def lay_out_hub_cache(folder: Path, files: list[ShippedFile], cache: Path, repo_id: str) -> str:
    """`cache/models--org--name/snapshots/<hash>/...` + `refs/main`, as `hf_hub_download` leaves a repo.

    The commit hash is derived from the file list, so the same folder gives the same fake commit.
    """
    digest = hashlib.sha1(json.dumps([(f.name, f.size) for f in files]).encode()).hexdigest()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / digest
    snapshot.mkdir(parents=True)
    for f in files:
        try:
            (snapshot / f.name).symlink_to((folder / f.name).resolve())
        except OSError:  # no symlinks on this filesystem
            shutil.copy2(folder / f.name, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(digest)
    return digest


def check_environment(work: Path, secrets: tuple[str, ...] = ()) -> dict[str, str]:
    """This environment offline, without tokens, with its own Hub and remote-code caches under `work`, and this
    process's torch threads (a CPU matmul's summation order depends on them: with other counts the same code and
    weights differ in the last bits, e.g. 8.9e-08 after `torch.set_num_threads(1)` here)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in TOKEN_VARIABLES and not any(secret and secret in value for secret in secrets)
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(work / "hub"),
        HF_MODULES_CACHE=str(work / "modules"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    return env


def verify_in_fresh_process(
    folder: str | Path,
    files: list[ShippedFile],
    model,
    tokenizer: PreTrainedTokenizerBase,
    repo_id: str | None = None,
    secrets: tuple[str, ...] = (),
    timeout: float = 900,
) -> VerifyReport:
    """Run `fresh_process_check.py` on the folder (and, given `repo_id`, on an offline Hub cache entry of it)."""
    start = time.perf_counter()
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="llama-hybrid-verify-") as tmp:
        work = Path(tmp)
        save_file(reference_outputs(model, tokenizer), work / "reference.safetensors")
        if repo_id:
            lay_out_hub_cache(folder, files, work / "hub", repo_id)
        spec = {
            "folder": str(folder),
            "reference": str(work / "reference.safetensors"),
            "tolerance": _tolerance(model.dtype),
            "chat_template": tokenizer.chat_template,
            "prompt": VERIFY_PROMPT,
            "repo_id": repo_id,
        }
        command = [sys.executable, "-c", CHECK_SCRIPT.read_text(encoding="utf-8"), json.dumps(spec)]
        try:
            result = subprocess.run(
                command,
                cwd=work,
                env=check_environment(work, secrets),
                stdin=subprocess.DEVNULL,  # a trust_remote_code prompt must fail, never wait
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise VerificationError(f"the fresh-process load of {folder} took over {timeout:.0f} s") from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not lines[-1].startswith("RESULT "):
        tail = "\n".join((result.stderr.strip() or result.stdout.strip()).splitlines()[-15:])
        raise VerificationError(f"the folder {folder} does not load correctly without llama-hybrid installed:\n{tail}")
    outcome = json.loads(lines[-1].removeprefix("RESULT "))
    return VerifyReport(**outcome, seconds=time.perf_counter() - start)


def _tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


__all__ = ["VerificationError", "VerifyReport", "lay_out_hub_cache", "reference_outputs", "verify_in_fresh_process"]
