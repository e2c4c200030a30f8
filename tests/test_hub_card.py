"""Tests for llama_hybrid.hub_upload.card: the model card a dry run writes (metadata, architecture table, eval
results, usage, license) and its pieces (active parameter count, provenance, eval results). Fixtures: conftest.py /
hub_support.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hub_support import REPO_ID
from huggingface_hub import ModelCard
from torch import nn

from llama_hybrid.hub_upload import card


def test_model_card_metadata_architecture_eval_usage(hub_dry_run):
    readme = ModelCard.load(hub_dry_run.folder / "README.md")
    meta = readme.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "unknown" and "custom_code" in meta["tags"] and "llama-hybrid" in meta["tags"]
    config = json.loads((hub_dry_run.folder / "config.json").read_text())
    for i in range(config["num_hidden_layers"]):
        assert f"\n| {i} | " in readme.text
    assert "parameters (total)" in readme.text and "parameters active per token" in readme.text
    assert "| perplexity | 12.35 |" in readme.text and "| data | pydoc |" in readme.text
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in readme.text
    assert "## License and attribution" in readme.text


# --- card pieces ---------------------------------------------------------------------------------------------------


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
