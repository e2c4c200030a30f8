"""`study/long_range.py`: its episodes put the answer exactly `d` tokens away, its window-only control really cuts the
model off from everything beyond the stacked windows (while the compressed layout does not), its layouts have equal
parameters, and `--quick` runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import study_scripts
import torch


@pytest.fixture(scope="module")
def study():
    return study_scripts.load("long_range")


@pytest.mark.parametrize("distance", [1, 4, 7, 33])
def test_passkey_answer_is_distance_tokens_after_the_value(study, distance):
    tokens, [answer] = study.passkey_episode(distance, torch.Generator().manual_seed(distance))
    assert answer == len(tokens) - 1 and tokens[answer - 1] == study.ASK
    value_at = tokens.index(study.KEY) + 1
    assert tokens[value_at] == tokens[answer] and tokens[value_at] in study.VALUES
    assert (answer - 1) - value_at == distance
    assert [t for t in tokens if t in study.VALUES] == [tokens[answer]] * 2  # stated once, then the answer


@pytest.mark.parametrize("distance", [7, 8, 40])
def test_recall_queries_lie_distance_tokens_after_their_pairs_on_average(study, distance):
    orders = set()
    for seed in range(10):
        tokens, answers = study.recall_episode(distance, torch.Generator().manual_seed(seed))
        assert len(answers) == study.PAIRS and answers[-1] == len(tokens) - 1
        distances = []
        for answer in answers:
            query_at = answer - 1
            key = tokens[query_at]
            assert key in study.KEYS and tokens.count(key) == 2  # once in the pairs, once as the query
            key_at = tokens.index(key)
            assert tokens[key_at + 1] == tokens[answer] and tokens[answer] in study.VALUES
            distances.append(query_at - (key_at + 1))
        assert sum(distances) == distance * study.PAIRS
        assert all(abs(d - distance) <= study.QUERY_SPREAD for d in distances)
        orders.add(tuple(distances))
        context = [t for t in tokens[: answers[0] - 1] if t in study.KEYS or t in study.VALUES]
        assert len(context) == 2 * study.PAIRS
    assert len(orders) > 1  # the queries' order varies, so no fixed offset finds the pair


def test_recall_refuses_distances_its_layout_cannot_hold(study):
    with pytest.raises(ValueError, match="distance >= 7"):
        study.recall_episode(study.MIN_RECALL_DISTANCE - 1, torch.Generator())


def test_batches_label_only_the_answers(study):
    for task, answers in (("passkey", 1), ("recall", study.PAIRS)):
        batch = study.batch_of(task, 12, 5, torch.Generator().manual_seed(0))
        labelled = batch["labels"] != -100
        assert labelled.sum(dim=1).tolist() == [answers] * 5
        lengths = batch["attention_mask"].sum(dim=1)
        assert labelled.cumsum(dim=1).argmax(dim=1).tolist() == (lengths - 1).tolist()  # last answer: last token
        assert (batch["labels"][labelled] == batch["input_ids"][labelled]).all()
        assert (batch["input_ids"][batch["attention_mask"] == 0] == study.PAD).all()


def test_layouts_have_equal_parameters(study):
    totals = {layout: sum(p.numel() for p in study.build_model(layout, 0).parameters()) for layout in study.LAYOUTS}
    reference = totals["llama"]
    assert all(abs(total / reference - 1) < 0.01 for total in totals.values()), totals


def last_logits_change(model, study, position_from_end: int) -> float:
    """max |Δ last-position logits| when one token `position_from_end` tokens before the last one changes."""
    model.eval()
    ids = torch.tensor([[study.BOS] + [study.FILLER[i % len(study.FILLER)] for i in range(95)]])
    changed = ids.clone()
    changed[0, -1 - position_from_end] = study.VALUES[3]
    with torch.no_grad():
        return (model(changed).logits[0, -1] - model(ids).logits[0, -1]).abs().max().item()


def test_window_only_control_sees_nothing_beyond_its_stacked_windows(study):
    reach = study.LAYERS * (study.WINDOW - 1)  # each layer looks W - 1 tokens back
    far = reach + 2 * study.BLOCK
    control, compressed = study.build_model("window-only", 0), study.build_model("compressed", 0)
    assert last_logits_change(control, study, far) == 0.0
    assert last_logits_change(control, study, study.WINDOW // 2) > 1e-4  # it does see its window
    assert last_logits_change(compressed, study, far) > 1e-4  # the global branch carries the far token


def test_quick_run_end_to_end(study, tmp_path):
    study_scripts.run("long_range", "--quick", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    size = study.SIZES["quick"]
    assert {(r["layout"], r["seed"]) for r in saved["runs"]} == {
        (layout, seed) for layout in study.LAYOUTS for seed in range(size.seeds)
    }
    for run in saved["runs"]:
        for task in study.TASKS:
            scores = run["accuracy"][task]
            assert set(scores) == {str(d) for d in study.task_distances(task, size)}
            assert all(0.0 <= a <= 1.0 for a in scores.values())
    for task in study.TASKS:
        assert set(saved["summary"][task]) == {str(d) for d in study.task_distances(task, size)}
    assert (tmp_path / f"{tmp_path.name}.png").stat().st_size > 0
    assert "window-only" in (tmp_path / "results.md").read_text()


def test_render_without_a_run_is_one_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, str(study_scripts.REPO / "study" / "long_range.py"), "--render", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("run the study into that folder first")
