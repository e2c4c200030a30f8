"""`benchmarks/long_context.py --smoke` (tiny shape, CPU, fp32): it exits 0 and reports every (context, layout) row
with its ratios, the hybrid's compressed layers keep their own cache, and the cache bytes it measures are the ones
computed from the config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONTEXTS = (64, 160)  # benchmarks/long_context.py SMOKE_CONTEXTS
LAYOUTS = ("llama", "hybrid")


def test_long_context_smoke(tmp_path):
    log = tmp_path / "long_context.jsonl"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "long_context.py"), "--smoke", "--threads", "1", "--json", str(log)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["kind"] == "env" and records[-1]["kind"] == "done"
    params = {r["layout"]: r for r in records if r["kind"] == "params"}
    assert abs(params["hybrid"]["total"] / params["llama"]["total"] - 1) <= 0.02
    rows = {(r["context"], r["layout"]): r for r in records if r["kind"] == "row"}
    assert set(rows) == {(c, name) for c in SMOKE_CONTEXTS for name in LAYOUTS}
    for row in rows.values():
        assert "error" not in row, row
        for key in ("prefill_s", "decode_ms", "peak_rss_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["cache_bytes"] == row["cache_bytes_from_config"] > 0
    for context in SMOKE_CONTEXTS:
        assert "CompressedSparseLayer" in rows[(context, "hybrid")]["cache_layers"]
        assert "CompressedSparseLayer" not in rows[(context, "llama")]["cache_layers"]
    ratios = {r["context"]: r for r in records if r["kind"] == "ratio"}
    assert set(ratios) == set(SMOKE_CONTEXTS)
    for r in ratios.values():
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("prefill_speedup", "decode_speedup", "cache_ratio"))
        assert r["cache_floor"] <= r["cache_ratio"] < 1
    table = done.stdout.splitlines()
    for context in SMOKE_CONTEXTS:  # the printed table has every row
        for name in (*LAYOUTS, "ratio"):
            assert any(line.split()[:2] == [str(context), name] for line in table), (context, name)
    assert any("cache floor 1/6" in line for line in table)


def test_sparse_layer_speed_times_every_layer_kind():
    """`benchmarks/sparse_layer_speed.py` on a tiny length: a row per layer kind with finite prefill and decode times
    (the timed layer was called: the hooks saw it) and ratios against full attention."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sparse_layer_speed.py"), "--lengths", "200", "--window", "32",
         "--block", "16", "--repeats", "1", "--decode-steps", "2", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = {line.split()[1]: line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["200"]}
    assert set(rows) == {
        "attention",
        "full",
        "compressed",
        "selected",
        "selected-uncapped",
        "selected-sparq",
        "selected-fixed",
    }
    for _n, _layer, prefill, decode, prefill_ratio, decode_ratio in rows.values():
        assert float(prefill) > 0 and float(decode) > 0
        assert math.isfinite(float(prefill_ratio.rstrip("x"))) and math.isfinite(float(decode_ratio.rstrip("x")))
    assert rows["attention"][4:] == ["1.00x", "1.00x"]
