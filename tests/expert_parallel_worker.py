"""One rank of the expert-parallel test (`torchrun --nproc_per_node 2`, gloo): the model loaded with this
transformers version's expert-parallel config (`compat.expert_parallel_config`) against the unsharded model, forward
(logits) and backward (loss and every gradient on the same weights and batch; a sharded weight's gradient against its
slice of the unsharded one). Imports come from PYTHONPATH (set by the test). Rank 0 writes the comparison to
OUT_DIR/ep_result.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from modeling_llama_hybrid import LlamaHybridForCausalLM
from modeling_llama_hybrid.compat import expert_parallel_config

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
world = dist.get_world_size()
sharded = LlamaHybridForCausalLM.from_pretrained(
    model_dir, distributed_config=expert_parallel_config(world), dtype=torch.float32
).eval()
single = LlamaHybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
input_ids = torch.randint(3, single.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    sharded_logits, single_logits = sharded(input_ids).logits, single(input_ids).logits
layer = next(i for i, kind in enumerate(single.config.mlp_layer_types) if kind == "sparse")
experts = sharded.model.layers[layer].mlp.experts.gate_up_proj
local = experts.to_local() if hasattr(experts, "to_local") else experts


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def gradient_diffs() -> dict[str, float]:
    """Max |EP grad - one-process grad| per parameter: the slice this rank holds where the weight is sharded
    (experts along dim 0, and on 5.24+ the tensor-parallel shards of the rest; every shard but the last is
    ceil(size / ranks) long, as DTensor splits)."""
    rank, world, diffs = dist.get_rank(), dist.get_world_size(), {}
    single_params = dict(single.named_parameters())
    for name, param in sharded.named_parameters():
        want, got = single_params[name].grad, param.grad
        if want is None or got is None:
            diffs[name] = float("inf") if (want is None) != (got is None) else 0.0
            continue
        got = local_tensor(got)
        for dim in range(want.ndim):
            if got.shape[dim] != want.shape[dim]:
                want = want.narrow(dim, rank * -(-want.shape[dim] // world), got.shape[dim])
        diffs[name] = (got - want).abs().max().item()
    return diffs


sharded.train(), single.train()
labels = torch.randint(3, single.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
sharded_loss, single_loss = sharded(input_ids, labels=labels).loss, single(input_ids, labels=labels).loss
sharded_loss.backward()
single_loss.backward()
result = {
    "logit_diff": (sharded_logits - single_logits).abs().max().item(),
    "loss_diff": (sharded_loss - single_loss).abs().item(),
    "grad_diffs": gradient_diffs(),
    "local_experts": local.shape[0],
    "num_experts": single.config.num_experts,
}
if dist.get_rank() == 0:
    (out_dir / "ep_result.json").write_text(json.dumps(result))
dist.destroy_process_group()
