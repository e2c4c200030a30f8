"""The GPU benchmarks' `--smoke` runs (tiny models, CPU, fp32): every section runs, nothing records an error, the
same-weight checks agree, and the final table has finite ratios. GPU sessions are rare and short; this keeps
`benchmarks/gpu_train.py` and `benchmarks/gpu_decode.py` runnable the first time between them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_smoke(script: str, out: Path) -> tuple[list[dict], str]:
    env = {**os.environ, "OUT": str(out)}  # the scripts import the installed package
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    log = out / script.replace(".py", ".jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()], done.stdout


def check_common(records: list[dict], stdout: str, sections: tuple[str, ...]) -> list[dict]:
    errors = [r for r in records if r.get("kind") == "error"]
    assert not errors, errors
    assert records[0]["section"] == "env" and records[-1]["section"] == "done"
    for section in sections:
        assert any(r["section"] == section for r in records), f"no record from section {section}"
    rows = [r for r in records if r.get("kind") == "row"]
    assert rows
    for row in rows:
        assert row["ours"] is not None and math.isfinite(row["ours"]), row
        if row["peer"] is not None:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
    table = stdout.rstrip().splitlines()
    assert table[-len(rows) - 2].startswith("what "), "the table is not printed last"
    return rows


def compiled_rows_expected() -> bool:
    return (REPO / "llama_hybrid" / "compilation.py").exists()


def test_train_smoke(tmp_path):
    records, stdout = run_smoke("gpu_train.py", tmp_path)
    check_common(records, stdout, ("llama", "moe", "hybrid"))
    trained = {(r["section"], r["model"]) for r in records if r.get("kind") == "train"}
    for section in ("llama", "moe", "hybrid"):
        assert (section, "ours sdpa") in trained
        assert any(s == section and m.startswith("HF ") for s, m in trained)
        assert ((section, "ours compiled") in trained) == compiled_rows_expected()
    for check in (r for r in records if r.get("kind") == "logits"):  # same weights in fp32: the same model
        assert check["max_abs_logit_diff"] < 1e-4 and check["top1_agreement"] == 1.0, check
    params = next(r for r in records if r.get("kind") == "params")
    assert abs(params["ours_total"] / params["peer_total"] - 1) < 0.03, params
    for train in (r for r in records if r.get("kind") == "train"):
        assert math.isfinite(train["last_loss"]) and 0 < train["mfu"], train


def test_decode_smoke(tmp_path):
    records, stdout = run_smoke("gpu_decode.py", tmp_path)
    rows = check_common(records, stdout, ("hf", "ours"))
    decoded = {(r["section"], r["mode"]) for r in records if r.get("kind") == "decode"}
    assert decoded == {(model, mode) for model in ("hf", "ours") for mode in ("dynamic", "static")}
    for check in (r for r in records if r.get("kind") == "agreement"):  # fp32: static and dynamic caches agree
        assert check["agreement"] == 1.0, check
    assert len(rows) == 5
