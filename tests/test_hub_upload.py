"""Tests for llama_hybrid.hub_upload: the Hub folder, its fresh-process and offline-Hub loading without the
package, the dry run, safety (no pickles, no token leaks) and the remote error paths (HfApi mocked, no network)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalEntryNotFoundError, Response, RevisionNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn

import modeling_llama_hybrid
from llama_hybrid.cli import main
from llama_hybrid.hub_upload import card, folder, publish, verify
from llama_hybrid.tokenization import model_config_kwargs, save_tokenizer, train_tokenizer_from_iterator
from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

REPO_ID = "tester/tiny-llama-hybrid"
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"
CORPUS = ["The capital of France is Paris. What is the capital of Italy? Rome is.", "hello world, the cat sat"] * 40
HYBRID_LAYOUT = dict(
    num_hidden_layers=3,
    mixer_types=["attention", "conv", "sparse_attention"],
    mlp_layer_types=["dense", "sparse", "dense"],
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    sliding_window=4,
    compress_block_size=2,
)


def tiny_model(tokenizer) -> LlamaHybridForCausalLM:
    """A random tiny model; with every mixer kind when this release implements them, else plain LLaMA."""
    base = dict(
        **model_config_kwargs(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    try:
        return LlamaHybridForCausalLM(LlamaHybridConfig(**base, **HYBRID_LAYOUT)).eval()
    except NotImplementedError:
        return LlamaHybridForCausalLM(LlamaHybridConfig(**base, num_hidden_layers=2)).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A LlamaHybrid folder as `convert` / training leave it, plus an eval_results.json."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer_from_iterator(CORPUS, vocab_size=300, min_frequency=1)
    tiny_model(tokenizer).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    (path / "eval_results.json").write_text(json.dumps({"perplexity": 12.3456, "tokens": 4096, "data": "pydoc"}))
    (path / "training_args.bin").write_bytes(b"\x80\x04pickle")  # what Trainer leaves; must never ship
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dry_run(model_dir, tmp_path_factory):
    """One real dry run (build + fresh-process verification), shared by the checks on its output and folder."""
    staging = tmp_path_factory.mktemp("staging") / "hub"
    code, out, err = run_cli(
        "push",
        str(model_dir),
        "--repo-id",
        REPO_ID,
        "--dry-run",
        "--staging-dir",
        str(staging),
        "--max-shard-size",
        "40KB",
    )
    assert code == 0, err
    return SimpleNamespace(out=out, err=err, folder=staging)


# --- the folder ----------------------------------------------------------------------------------------------


def test_folder_is_sharded_with_auto_map_and_remote_code(dry_run):
    names = {p.name for p in dry_run.folder.iterdir()}
    index = json.loads((dry_run.folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= names
    config = json.loads((dry_run.folder / "config.json").read_text())
    assert config["model_type"] == "llama_hybrid"
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
    }
    for reference in config["auto_map"].values():
        assert reference.split(".")[0] + ".py" in names
    package = Path(modeling_llama_hybrid.__file__).parent
    shipped_code = {p.name for p in dry_run.folder.glob("*.py")}
    assert shipped_code == {p.name for p in package.glob("*.py")} - {"__init__.py"}
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert "training_args.bin" not in names and "eval_results.json" not in names


def test_tokenizer_and_chat_template_ship(dry_run, model_dir):
    from transformers import AutoTokenizer

    source, shipped = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(dry_run.folder)
    assert shipped.chat_template == source.chat_template is not None
    assert shipped("Paris is")["input_ids"] == source("Paris is")["input_ids"]


def test_model_card_metadata_architecture_eval_usage(dry_run):
    readme = ModelCard.load(dry_run.folder / "README.md")
    meta = readme.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "unknown" and "custom_code" in meta["tags"] and "llama-hybrid" in meta["tags"]
    config = json.loads((dry_run.folder / "config.json").read_text())
    for i in range(config["num_hidden_layers"]):
        assert f"\n| {i} | " in readme.text
    assert "parameters (total)" in readme.text and "parameters active per token" in readme.text
    assert "| perplexity | 12.35 |" in readme.text and "| data | pydoc |" in readme.text
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in readme.text
    assert "## License and attribution" in readme.text


def test_dry_run_lists_every_file_with_its_size_and_sends_nothing(dry_run):
    for path in dry_run.folder.iterdir():
        assert f"{path.stat().st_size:,} B" in dry_run.out and f"  {path.name}\n" in dry_run.out
    assert f"https://huggingface.co/{REPO_ID}" in dry_run.out and "revision main" in dry_run.out
    assert "Skipped the remote checks" in dry_run.out and "nothing was sent" in dry_run.out
    assert "max |logit diff| 0" in dry_run.out and "offline Hub cache" in dry_run.out


# --- loading without the package -----------------------------------------------------------------------------

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


def test_offline_hub_cache_by_repo_id_without_the_package(dry_run, model_dir, tmp_path):
    """Lay the folder out as `$HF_HUB_CACHE/models--org--name/snapshots/<hash>` + refs/main and load by repo id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(dry_run.folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = LlamaHybridForCausalLM.from_pretrained(model_dir).eval()
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


def test_verification_catches_weights_that_do_not_reproduce_the_model(dry_run, model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dry_run.folder, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, shard, metadata={"format": "pt"})
    model, tokenizer = folder.load_model_dir(model_dir)
    with pytest.raises(verify.VerificationError, match="logits differ"):
        verify.verify_in_fresh_process(broken, folder.check_shippable(broken), model, tokenizer)


def test_lay_out_hub_cache_matches_the_hub_layout(dry_run, tmp_path):
    files = folder.check_shippable(dry_run.folder)
    commit = verify.lay_out_hub_cache(dry_run.folder, files, tmp_path, REPO_ID)
    repo = tmp_path / "models--tester--tiny-llama-hybrid"
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert (repo / "refs" / "main").read_text() == commit
    assert sorted(p.name for p in (repo / "snapshots" / commit).iterdir()) == sorted(f.name for f in files)


# --- safety ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "optimizer.pt", "model.pth", "state.pkl", "last.ckpt"])
def test_pickle_files_are_refused_by_name(dry_run, tmp_path, name):
    staged = tmp_path / "staged"
    shutil.copytree(dry_run.folder, staged)
    (staged / name).write_bytes(b"\x80\x04\x95pickled")
    with pytest.raises(ValueError, match=rf"refusing to ship {name}: pickle"):
        folder.check_shippable(staged)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("weights.dat", b"\x00\x01", "unknown file type"),
        ("notes.json", b"\xff\xfe\x00binary", "binary"),
        ("extra.safetensors", b"not a safetensors file", "not a valid safetensors"),
    ],
)
def test_unknown_or_disguised_binaries_are_refused(dry_run, tmp_path, name, content, reason):
    staged = tmp_path / "staged"
    shutil.copytree(dry_run.folder, staged)
    (staged / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"refusing to ship {name}: .*{reason}"):
        folder.check_shippable(staged)


def test_incomplete_folder_is_refused(dry_run, tmp_path):
    staged = tmp_path / "staged"
    shutil.copytree(dry_run.folder, staged)
    (staged / "modeling_llama_hybrid.py").unlink()
    with pytest.raises(ValueError, match="missing.*modeling_llama_hybrid.py"):
        folder.check_shippable(staged)


def test_model_dir_with_only_pickle_weights_or_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama_hybrid"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        folder.load_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model.*llama-hybrid convert"):
        folder.load_model_dir(tmp_path)


def test_remote_code_must_use_flat_sibling_imports(tmp_path):
    (tmp_path / "a.py").write_text("from .b import X\n")
    (tmp_path / "b.py").write_text("X = 1\n")
    folder.check_flat_imports([tmp_path / "a.py", tmp_path / "b.py"])
    for bad in ("from . import b\n", "from ..pkg import b\n", "from .sub.b import X\n", "from .missing import X\n"):
        (tmp_path / "a.py").write_text(bad)
        with pytest.raises(ValueError, match="flat sibling modules"):
            folder.check_flat_imports([tmp_path / "a.py", tmp_path / "b.py"])


def test_shipped_modules_are_flat_and_complete():
    files = folder.modeling_source_files()
    assert "__init__.py" not in {p.name for p in files}
    assert {ref.split(".")[0] + ".py" for ref in folder.auto_map().values()} <= {p.name for p in files}


# --- push: token and remote checks (HfApi mocked; nothing reaches the network) ----------------------------------


def fake_api(tmp_path, remote_config: dict | None = None, exists: bool = False) -> mock.MagicMock:
    api = mock.MagicMock(name="HfApi()")
    api.repo_exists.return_value = exists
    if remote_config is not None:
        path = tmp_path / "remote_config.json"
        path.write_text(json.dumps(remote_config))
        api.hf_hub_download.return_value = str(path)
    api.upload_folder.return_value = SimpleNamespace(commit_url=f"https://huggingface.co/{REPO_ID}/commit/abc123")
    return api


def test_push_uploads_exactly_the_checked_files_and_never_leaks_the_token(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_HUB_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path)
    staging = tmp_path / "staging"
    with mock.patch.object(publish, "HfApi", return_value=api) as hf_api:
        code, out, err = run_cli(
            "push", str(model_dir), "--repo-id", REPO_ID, "--token-env", "MY_HUB_TOKEN", "--private",
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


def test_no_token_fails_before_building(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(publish, "get_token", lambda: None)
    staging = tmp_path / "staging"
    code, _, err = run_cli("push", str(model_dir), "--repo-id", REPO_ID, "--staging-dir", str(staging))
    assert code == 2 and "No Hugging Face token" in err and "--dry-run" in err
    assert not staging.exists()
    code, _, err = run_cli("push", str(model_dir), "--repo-id", REPO_ID, "--token-env", "UNSET_TOKEN_VAR")
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
def test_unreachable_hub_is_reported_without_the_token(model_dir, tmp_path, monkeypatch, error):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path)
    api.repo_exists.side_effect = error
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, out, err = run_cli("push", str(model_dir), "--repo-id", REPO_ID)
    assert code == 2 and "Hugging Face Hub is unreachable" in err
    assert FAKE_TOKEN not in out + err
    api.upload_folder.assert_not_called()


def test_unreachable_while_reading_the_remote_config(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path, exists=True)
    api.hf_hub_download.side_effect = LocalEntryNotFoundError("An error happened while trying to locate the file")
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, _, err = run_cli("push", str(model_dir), "--repo-id", REPO_ID)
    assert code == 2 and "unreachable" in err


def test_repo_holding_another_model_type_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path, remote_config={"model_type": "llama"}, exists=True)
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, _, err = run_cli("push", str(model_dir), "--repo-id", REPO_ID)
    assert code == 2 and f"{REPO_ID} already holds a 'llama' model" in err
    api.create_repo.assert_not_called()
    api.upload_folder.assert_not_called()


def test_rejected_token_is_explained(model_dir, tmp_path, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = fake_api(tmp_path)
    request = sys.modules[Response.__module__.split(".")[0]].Request("GET", "https://huggingface.co/api/models/x")
    api.repo_exists.side_effect = HfHubHTTPError("401 Unauthorized", response=Response(401, request=request))
    with mock.patch.object(publish, "HfApi", return_value=api):
        code, _, err = run_cli("push", str(model_dir), "--repo-id", REPO_ID)
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


def test_bad_repo_id_and_shard_size_are_clear(model_dir):
    code, _, err = run_cli("push", str(model_dir), "--repo-id", "a/b/c", "--dry-run")
    assert code == 2 and "namespace/repo_name" in err
    code, _, err = run_cli("push", str(model_dir), "--repo-id", REPO_ID, "--dry-run", "--max-shard-size", "5TB")
    assert code == 2 and "--max-shard-size" in err


# --- card pieces -------------------------------------------------------------------------------------------------


def test_active_parameters_count_only_the_routed_experts_that_run():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 6, 3))  # [E, 2I, H]
            self.down_proj = nn.Parameter(torch.zeros(4, 3, 3))  # [E, H, I]

    model = nn.Module()
    model.config = SimpleNamespace(num_experts=4, num_experts_per_tok=1)
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].mlp = nn.Module()
    model.layers[0].mlp.experts = Experts()
    model.layers[0].mlp.gate = nn.Linear(3, 4, bias=False)
    total, active = card.parameter_counts(model)
    assert total == 72 + 36 + 12
    assert active == (72 + 36) // 4 + 12


def test_provenance_of_the_default_model_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_HYBRID_CACHE", str(tmp_path))
    default = tmp_path / "SmolLM2-135M-Instruct-llama-hybrid-format1"
    known = card.provenance_for(default)
    assert known.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and known.license == "apache-2.0"
    assert "Q4_1" in known.attribution
    assert card.provenance_for(tmp_path / "elsewhere") == card.Provenance()
    other = card.provenance_for(default, base_model="someone/other", license="mit")
    assert (other.base_model, other.license, other.attribution) == ("someone/other", "mit", None)


def test_eval_results_are_flattened_and_bad_json_is_named(tmp_path):
    assert card.read_eval_results(tmp_path) is None
    (tmp_path / "eval_results.json").write_text(json.dumps({"perplexity": 9.5, "speed": {"tokens_per_s": 100}}))
    assert card.read_eval_results(tmp_path) == {"perplexity": 9.5, "speed.tokens_per_s": 100}
    (tmp_path / "eval_results.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval_results.json is not valid JSON"):
        card.read_eval_results(tmp_path)


def test_shard_sizes_parse():
    assert folder.parse_shard_size("5GB") == 5 * 10**9
    assert folder.parse_shard_size("1GiB") == 2**30
    assert folder.parse_shard_size("4096") == 4096
    for bad in ("0", "-1", "5TB", "big"):
        with pytest.raises(ValueError, match="max-shard-size"):
            folder.parse_shard_size(bad)


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
