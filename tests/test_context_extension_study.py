"""`study/context_extension.py`: each model it compares is what its name says (positions, RoPE, which layers are
selected), on a tiny LLaMA; and two runs merge into one table."""

from __future__ import annotations

import json

import pytest
import study_scripts
from conftest import tiny_pair

study_scripts.load("passkey_probe")  # the study imports both by name
study_scripts.load("branch_retrieval")
study = study_scripts.load("context_extension")


def test_each_model_has_the_positions_rope_and_layers_its_name_says():
    llama, _ = tiny_pair(num_hidden_layers=4)
    trained = llama.config.max_position_embeddings
    models = {name: make() for name, make in study.builders(llama, 4 * trained).items()}
    assert models[study.LLAMA] is llama
    assert models[study.LLAMA_YARN].config.rope_parameters["rope_type"] == "yarn"
    for name, positions, rope, every in (
        (study.TRUE, "true", "default", False),
        (study.TRUE_YARN, "true", "yarn", False),
        (study.FIXED, "fixed", "default", True),
        (study.FIXED_ENDS, "fixed", "default", False),
    ):
        config = models[name].config
        assert config.select_positions == positions, name
        assert config.rope_parameters.get("rope_type", "default") == rope, name
        assert (config.mixer_types[0] == "sparse_attention") == every, name
        assert config.max_position_embeddings == 4 * trained


def test_two_runs_merge_into_one_table(tmp_path, capsys):
    row = {"key": "12345", "depth": 0.05, "distance": 900, "correct": True, "digit_accuracy": 1.0, "length": 16384}
    for folder, name in (("a", study.FIXED), ("b", study.LLAMA)):
        state = {
            "samples": [{**row, "model": name, "haystack": "prose"}],
            "perplexity": [{"model": name, "window": 16384, "ppl": 9.5}],
            "seconds": {name: {"16384": 60.0}},
            "window": 512,
            "setup": "setup",
        }
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(state))
    assert study.main(["--out", str(tmp_path / "a"), "--merge", str(tmp_path / "b")]) == 0
    table = (tmp_path / "a" / "results.md").read_text()
    assert f"| prose | {study.LLAMA} | 1/1 |" in table and f"| prose | {study.FIXED} | 1/1 |" in table
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--out", str(tmp_path / "a"), "--merge", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("no results.json there")
