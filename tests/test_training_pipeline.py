"""The end-to-end recipe (`llama-hybrid train all`) at its smallest size: every stage runs and reports."""

from __future__ import annotations

import json

import pytest

from llama_hybrid.training.pipeline import run_pipeline


@pytest.mark.slow  # ~40 s of CPU: five Trainer runs, generation and TRL set-up, even at the smallest size
def test_pipeline_runs_every_stage_and_reports_per_round_perplexity(tmp_path, capsys):
    summary = run_pipeline(tmp_path / "e2e", size="test")
    printed = capsys.readouterr().out
    for stage in ("1. clean", "2. pretrain", "3. self-train", "4. augment", "5. sft", "######## summary"):
        assert stage in printed
    assert summary["clean"]["dropped"]["exact_duplicate"] == 3 and summary["clean"]["dropped"]["too_short"] == 1
    assert [row["round"] for row in summary["self_train"]] == [0, 1, 2]
    assert all(row["heldout_perplexity"] > 1 for row in summary["self_train"])
    assert summary["sft"]["loss_on"] == "assistant turns"
    assert json.loads((tmp_path / "e2e" / "summary.json").read_text())["self_train"][2]["round"] == 2
    assert (tmp_path / "e2e" / "sft" / "model.safetensors").is_file()
