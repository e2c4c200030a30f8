"""Two CPU processes (`torchrun --standalone --nproc_per_node 2`, gloo): a DDP training step equals the
single-process step, and loading with the tensor-parallel plan gives the same logits.

One torchrun launch runs both checks (process start-up dominates the cost); the tests read its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_llama_hybrid import LlamaHybridConfig, LlamaHybridForCausalLM

TESTS_DIR = Path(__file__).parent

WORKER = r"""
import copy, json, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hybrid_mixer_fixtures import tiny_model  # tests/, on PYTHONPATH
from modeling_llama_hybrid import LlamaHybridForCausalLM

out_dir, model_dir = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
results = {}

# --- DDP: each rank takes half of the batch; the loss is normalised by the label tokens of the whole batch ---
model = tiny_model("conv", attn="sdpa", router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()
reference = copy.deepcopy(model)
x = torch.randint(3, model.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0))
num_items = (x[:, 1:] != -100).sum()

reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
reference(input_ids=x, labels=x, num_items_in_batch=num_items).loss.backward()
reference_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
reference_opt.step()

ddp = DistributedDataParallel(model, find_unused_parameters=True)  # MoE: unrouted experts get no gradient
opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
shard = x[2 * rank : 2 * rank + 2]
loss = ddp(input_ids=shard, labels=shard, num_items_in_batch=num_items).loss * world  # DDP averages over ranks
loss.backward()
grad_diff = max((p.grad - reference_grads[n]).abs().max().item()
                for n, p in model.named_parameters() if n in reference_grads)
opt.step()
param_diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
results["ddp"] = {"grad_diff": grad_diff, "param_diff": param_diff}

# --- tensor parallel: the config's TP plan shards attention and dense MLP across the two ranks ---
from transformers.distributed import DistributedConfig

tp_model = LlamaHybridForCausalLM.from_pretrained(
    model_dir, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32
).eval()
single = LlamaHybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
x = torch.randint(3, single.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    tp_logits, single_logits = tp_model(input_ids=x).logits, single(input_ids=x).logits
q_proj = tp_model.model.layers[0].self_attn.q_proj.weight
local = q_proj.to_local() if hasattr(q_proj, "to_local") else q_proj
results["tp"] = {"logit_diff": (tp_logits - single_logits).abs().max().item(), "q_proj_local": list(local.shape),
                 "q_proj_full": list(single.model.layers[0].self_attn.q_proj.weight.shape)}

with open(f"{out_dir}/rank{rank}.json", "w") as f:
    json.dump(results, f)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    config = LlamaHybridConfig(
        vocab_size=71,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mixer_types=["attention", "conv"],
        mlp_layer_types=["dense", "sparse"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    torch.manual_seed(0)
    LlamaHybridForCausalLM(config).save_pretrained(root / "model")
    (root / "worker.py").write_text(WORKER)
    pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))  # the fixtures
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": pythonpath}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "worker.py"), str(root), str(root / "model")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_step_on_two_processes_equals_the_single_process_step(two_process_results):
    for rank in two_process_results:
        assert rank["ddp"]["grad_diff"] < 1e-5
        assert rank["ddp"]["param_diff"] < 1e-5


def test_tensor_parallel_plan_on_two_processes_gives_the_same_logits(two_process_results):
    for rank in two_process_results:
        assert rank["tp"]["logit_diff"] < 1e-5
        assert rank["tp"]["q_proj_local"][0] * 2 == rank["tp"]["q_proj_full"][0]  # really sharded
