"""Tests for llama_hybrid.hub_upload.folder: the Hub folder a dry run builds (shards, auto_map, the remote code, the
tokenizer) and what it refuses to ship (pickles, unknown or disguised binaries, an incomplete folder, non-flat
remote-code imports), the model folder it accepts, and shard sizes. Fixtures: conftest.py / hub_support.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import modeling_llama_hybrid
from llama_hybrid.hub_upload import folder

# --- the folder ----------------------------------------------------------------------------------------------------


def test_folder_is_sharded_with_auto_map_and_remote_code(hub_dry_run):
    names = {p.name for p in hub_dry_run.folder.iterdir()}
    index = json.loads((hub_dry_run.folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= names
    config = json.loads((hub_dry_run.folder / "config.json").read_text())
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
    shipped_code = {p.name for p in hub_dry_run.folder.glob("*.py")}
    assert shipped_code == {p.name for p in package.glob("*.py")} - {"__init__.py"}
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert "training_args.bin" not in names and "eval_results.json" not in names


def test_tokenizer_and_chat_template_ship(hub_dry_run, hub_model_dir):
    from transformers import AutoTokenizer

    source, shipped = AutoTokenizer.from_pretrained(hub_model_dir), AutoTokenizer.from_pretrained(hub_dry_run.folder)
    assert shipped.chat_template == source.chat_template is not None
    assert shipped("Paris is")["input_ids"] == source("Paris is")["input_ids"]


def test_shard_sizes_parse():
    assert folder.parse_shard_size("5GB") == 5 * 10**9
    assert folder.parse_shard_size("1GiB") == 2**30
    assert folder.parse_shard_size("4096") == 4096
    for bad in ("0", "-1", "5TB", "big"):
        with pytest.raises(ValueError, match="max-shard-size"):
            folder.parse_shard_size(bad)


# --- safety --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "optimizer.pt", "model.pth", "state.pkl", "last.ckpt"])
def test_pickle_files_are_refused_by_name(hub_dry_run, tmp_path, name):
    staged = tmp_path / "staged"
    shutil.copytree(hub_dry_run.folder, staged)
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
def test_unknown_or_disguised_binaries_are_refused(hub_dry_run, tmp_path, name, content, reason):
    staged = tmp_path / "staged"
    shutil.copytree(hub_dry_run.folder, staged)
    (staged / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"refusing to ship {name}: .*{reason}"):
        folder.check_shippable(staged)


def test_incomplete_folder_is_refused(hub_dry_run, tmp_path):
    staged = tmp_path / "staged"
    shutil.copytree(hub_dry_run.folder, staged)
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
