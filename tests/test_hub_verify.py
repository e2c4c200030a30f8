"""Tests for llama_hybrid.hub_upload.verify and fresh_process_check.py: the built folder loads in a fresh process
without the package (offline Hub cache, by repo id), verification catches weights that do not reproduce the model,
and the Hub cache layout it lays out. Fixtures: conftest.py / hub_support.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_support import REPO_ID
from safetensors.torch import load_file, save_file

from llama_hybrid.hub_upload import folder, verify
from modeling_llama_hybrid import LlamaHybridForCausalLM

HIDE_PACKAGES = textwrap.dedent(
    """
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("llama_hybrid", "modeling_llama_hybrid"):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Hide())
    for name in ("llama_hybrid", "modeling_llama_hybrid"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        raise SystemExit(f"{name} still imports")
    """
)


def test_package_is_importable_here_so_hiding_it_means_something(tmp_path):
    find = "import importlib.util as u; assert u.find_spec('modeling_llama_hybrid') and u.find_spec('llama_hybrid')"
    visible = subprocess.run([sys.executable, "-c", find], cwd=tmp_path)
    assert visible.returncode == 0
    hidden = subprocess.run(
        [sys.executable, "-c", HIDE_PACKAGES + "import modeling_llama_hybrid"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert hidden.returncode != 0 and "ModuleNotFoundError" in hidden.stderr


def test_offline_hub_cache_by_repo_id_without_the_package(hub_dry_run, hub_model_dir, tmp_path):
    """Lay the folder out as `$HF_HUB_CACHE/models--org--name/snapshots/<hash>` + refs/main and load by repo id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(hub_dry_run.folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = LlamaHybridForCausalLM.from_pretrained(hub_model_dir).eval()
    input_ids = torch.tensor([[1, 5, 9, 42, 7, 100]])
    with torch.no_grad():
        save_file({"input_ids": input_ids, "logits": model(input_ids).logits}, tmp_path / "expected.safetensors")
    script = HIDE_PACKAGES + textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
        expected = load_file("expected.safetensors")
        config = AutoConfig.from_pretrained("{REPO_ID}", trust_remote_code=True)
        assert config.model_type == "llama_hybrid" and type(config).__module__.startswith("transformers_modules")
        tokenizer = AutoTokenizer.from_pretrained("{REPO_ID}", trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
        text = pipeline("text-generation", model="{REPO_ID}", trust_remote_code=True)("Paris", max_new_tokens=3)
        assert text[0]["generated_text"].startswith("Paris")
        assert not [m for m in sys.modules if m.split(".")[0] in ("llama_hybrid", "modeling_llama_hybrid")]
        print("LOADED", model.config.model_type)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED llama_hybrid" in result.stdout


def test_verification_catches_weights_that_do_not_reproduce_the_model(hub_dry_run, hub_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hub_dry_run.folder, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, shard, metadata={"format": "pt"})
    model, tokenizer = folder.load_model_dir(hub_model_dir)
    with pytest.raises(verify.VerificationError, match="logits differ"):
        verify.verify_in_fresh_process(broken, folder.check_shippable(broken), model, tokenizer)


def test_lay_out_hub_cache_matches_the_hub_layout(hub_dry_run, tmp_path):
    files = folder.check_shippable(hub_dry_run.folder)
    commit = verify.lay_out_hub_cache(hub_dry_run.folder, files, tmp_path, REPO_ID)
    repo = tmp_path / "models--tester--tiny-llama-hybrid"
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert (repo / "refs" / "main").read_text() == commit
    assert sorted(p.name for p in (repo / "snapshots" / commit).iterdir()) == sorted(f.name for f in files)
