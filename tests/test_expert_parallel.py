"""Expert parallelism on two CPU processes (gloo): the MoE layers' fused experts split by expert over the ranks
with this transformers version's plan and switch (5.17 and 5.24 differ: `compat.EXPERT_PARALLEL_PLAN`); the logits,
the training loss and every gradient equal the unsharded model's on the same weights and batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hybrid_mixer_fixtures import tiny_config

from modeling_llama_hybrid import LlamaHybridForCausalLM

REPO = Path(__file__).resolve().parents[1]


def test_expert_parallel_shards_the_experts_and_gives_the_unsharded_logits_and_gradients(tmp_path):
    config = tiny_config(
        "conv",
        attn="sdpa",
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mixer_types=["conv", "sparse_attention"],
        mlp_layer_types=["dense", "sparse"],
        num_experts=4,
        moe_intermediate_size=16,
        num_shared_experts=1,
    )
    torch.manual_seed(0)
    LlamaHybridForCausalLM(config).save_pretrained(tmp_path / "model")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "expert_parallel_worker.py"), str(tmp_path / "model"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "ep_result.json").read_text())
    assert result["local_experts"] * 2 == result["num_experts"]  # each rank holds half of the experts
    assert result["logit_diff"] < 1e-5
    assert result["loss_diff"] < 1e-5
    experts = [name for name in result["grad_diffs"] if ".mlp.experts." in name]
    assert experts and len(result["grad_diffs"]) == len(dict(LlamaHybridForCausalLM(config).named_parameters()))
    assert {name: diff for name, diff in result["grad_diffs"].items() if not diff < 1e-5} == {}
