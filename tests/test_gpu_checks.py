"""The fast paths' correctness checks (tests/gpu_checks.py): CPU twins in fp32 on a tiny model, and the same
checks on a GPU in bf16 (marked `gpu`, skipped without CUDA; `benchmarks/gpu_session.sh` part 1 runs them)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from gpu_checks import CHECKS, compare_logits, run_checks


@pytest.mark.parametrize("name", list(CHECKS))
def test_fast_path_matches_reference_on_cpu(name):
    result = run_checks([name], "tiny", "cpu", torch.float32)[name]
    assert result["ok"], result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CHECKS))
def test_fast_path_matches_reference_on_gpu(name):
    """With OUT set (a GPU session), each check's numbers are also appended to $OUT/gpu_checks.jsonl."""
    out = os.environ.get("OUT")
    with open(Path(out) / "gpu_checks.jsonl", "a") if out else contextlib.nullcontext() as log:
        result = run_checks([name], "gpu", "cuda", torch.bfloat16, log)[name]
    print(name, {k: v for k, v in result.items() if k != "traceback"})
    assert result["ok"], result


def test_comparison_fails_on_a_wrong_answer():
    """The tolerance logic can fail: one flipped prediction or a large error is caught in fp32."""
    reference = torch.randn(4, 7, 11)
    assert compare_logits(reference, reference.clone(), torch.float32)["ok"]
    flipped = reference.clone()
    flipped[0, 0, reference[0, 0].argmin()] = reference.max() + 1
    result = compare_logits(reference, flipped, torch.float32)
    assert not result["ok"] and result["top1"] < 1
    assert not compare_logits(reference, reference + 1e-2, torch.float32)["ok"]


def test_a_raising_check_is_reported_not_fatal(monkeypatch):
    def broken(size, device, dtype):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(CHECKS, "broken", broken)
    results = run_checks(["broken", "experts"], "tiny", "cpu", torch.float32)
    assert not results["broken"]["ok"] and "kernel exploded" in results["broken"]["error"]
    assert results["experts"]["ok"]
