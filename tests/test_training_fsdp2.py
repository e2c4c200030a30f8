"""FSDP2 for real: the shipped `examples/accelerate/fsdp2.yaml` on two CPU processes (gloo) trains a tiny hybrid
(short conv, sparse attention, MoE) exactly like one process on the same global batches.

`accelerate launch` reads the config (FSDP version 2, one shard unit per `LlamaHybridDecoderLayer`, resharding after
forward, CPU-RAM-efficient loading: rank 0 reads the weights and broadcasts them); only the process count and the
mixed precision are overridden on the command line (2 CPU processes, fp32 for an exact comparison). The router
losses are off: they are per-rank batch means and would differ from the full-batch loss by design (see
docs/training.md); cross-entropy normalised by the global batch's label tokens is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hybrid_mixer_fixtures import randomize_gates, tiny_config
from safetensors.torch import load_file, save_file

from modeling_llama_hybrid import LlamaHybridForCausalLM

REPO = Path(__file__).resolve().parents[1]
FSDP2_CONFIG = REPO / "examples" / "accelerate" / "fsdp2.yaml"
STEPS, GLOBAL_BATCH, SEQ_LEN = 3, 4, 11


def tiny_hybrid() -> LlamaHybridForCausalLM:
    config = tiny_config(
        "conv",
        attn="sdpa",
        num_hidden_layers=3,
        mixer_types=["conv", "sparse_attention", "attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
    )
    torch.manual_seed(0)
    model = LlamaHybridForCausalLM(config)
    randomize_gates(model)
    return model


def train_one_process(model_dir: Path, batches: dict[str, torch.Tensor]):
    model = LlamaHybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for input_ids in batches.values():
        num_items = (input_ids[:, 1:] != -100).sum()
        loss = model(input_ids=input_ids, labels=input_ids, num_items_in_batch=num_items).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, dict(model.named_parameters()), load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate's launcher is not installed beside this interpreter")
    root = tmp_path_factory.mktemp("fsdp2")
    tiny_hybrid().save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(3)
    vocab = tiny_config().vocab_size
    batches = {f"step{i}": torch.randint(3, vocab, (GLOBAL_BATCH, SEQ_LEN), generator=generator) for i in range(STEPS)}
    save_file(batches, root / "batches.safetensors")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--config_file", str(FSDP2_CONFIG), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", "0", str(REPO / "tests" / "fsdp2_worker.py"),
               str(root / "model"), str(root / "batches.safetensors"), str(root)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((root / "fsdp_result.json").read_text())
    return result, load_file(root / "fsdp_weights.safetensors"), train_one_process(root / "model", batches)


def test_fsdp2_config_shards_every_decoder_layer(fsdp2_run):
    result, weights, _ = fsdp2_run
    assert result["plugin_version"] == 2
    assert result["sharded_layers"] == 3  # one FSDP unit per LlamaHybridDecoderLayer
    assert result["probe_local_shape"][0] * 2 == weights[result["probe"]].shape[0]  # dim 0 split over the 2 ranks


def test_fsdp2_training_matches_one_process(fsdp2_run):
    result, fsdp_weights, (single_losses, single_weights, initial) = fsdp2_run
    assert result["losses"] == pytest.approx(single_losses, abs=1e-5)
    assert not torch.equal(
        fsdp_weights["model.layers.1.mlp.experts.gate_up_proj"], initial["model.layers.1.mlp.experts.gate_up_proj"]
    )
    assert fsdp_weights.keys() == single_weights.keys()
    for name, param in single_weights.items():
        torch.testing.assert_close(fsdp_weights[name], param.detach(), atol=1e-5, rtol=1e-5, msg=name)
