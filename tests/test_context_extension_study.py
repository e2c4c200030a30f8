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


def test_a_smoke_test_never_joins_the_published_run(tmp_path, capsys):
    """The published run's folder is committed (a fresh clone resumes it): a --quick run or a quick run's folder
    given to --merge is refused with one error line, and the defaults keep the two apart."""
    published = {"samples": [], "perplexity": [], "seconds": {}, "size": "full"}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text(json.dumps(published))
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "results.json").write_text(json.dumps({**published, "size": "quick"}))
    for argv, message in (
        (["--quick", "--out", str(tmp_path / "full")], "holds a full run, not a quick one"),
        (["--out", str(tmp_path / "full"), "--merge", str(tmp_path / "quick")], "a quick run, not a full one"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            study.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert json.loads((tmp_path / "full" / "results.json").read_text()) == published  # untouched
    retrieval = study_scripts.load("branch_retrieval")
    published_folder = retrieval.run_folder(None, "context-extension", quick=False)
    assert published_folder.endswith("study/results/context-extension")
    assert retrieval.run_folder(None, "context-extension", quick=True).endswith("out/context-extension-quick")


def test_a_larger_budget_runs_only_the_samples_a_cell_lacks_and_shows_what_a_miss_read_out(
    tmp_path, monkeypatch, default_model_dir
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    llama, _ = tiny_pair(num_hidden_layers=4)
    prose = study.probe.encode(tokenizer, "\n\n".join(study.pydoc_topics().values()))
    wanted = study.retrieval.prompts(tokenizer, "prose", 2048, 3, prose)
    asked = []

    def evaluate(name, model, probes):  # the model "reads out" the key with its first digit wrong
        ((length, (prompt,)),) = probes.items()
        asked.append(prompt.key)
        wrong = study.probe.encode(tokenizer, str((int(prompt.key[0]) + 1) % 10) + prompt.key[1:])
        row = {"key": prompt.key, "depth": prompt.depth, "distance": prompt.distance, "correct": False}
        return [{**row, "digit_accuracy": 0.8, "predicted_ids": wrong, "model": name, "length": length}]

    monkeypatch.setattr(study.probe, "source_llama", lambda out: (llama, tokenizer))
    monkeypatch.setattr(study.probe, "evaluate", evaluate)
    monkeypatch.setitem(study.BUDGET, "quick", [(2048, study.LLAMA, 3, ("prose",))])
    kept = {"key": wanted[0].key, "depth": 0.05, "distance": 1900, "correct": True, "digit_accuracy": 1.0}
    state = {
        "samples": [{**kept, "length": 2048, "model": study.LLAMA, "haystack": "prose"}],
        "perplexity": [],
        "seconds": {study.LLAMA: {"2048": 99.0}},
    }
    (tmp_path / "results.json").write_text(json.dumps(state))
    assert study.main(["--quick", "--out", str(tmp_path), "--no-perplexity"]) == 0
    assert asked == [p.key for p in wanted[1:]]  # prompts are prefix-stable: the kept sample is not run again
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in saved["samples"]] == [p.key for p in wanted]
    assert all(r["predicted"] == tokenizer.decode(r["predicted_ids"]) for r in saved["samples"][1:])
    assert all(r["seconds"] >= 0 for r in saved["samples"][1:])
    table = (tmp_path / "results.md").read_text()
    assert f"| prose | {study.LLAMA} | 1/3 |" in table
    for row in saved["samples"][1:]:
        assert f"| {row['key']} | {row['predicted']!r} |" in table and row["predicted"][1:] == row["key"][1:]
    assert "99 s" not in table  # timed samples replace an earlier run's mean
