"""One rank of the FSDP2 test: `accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2
--mixed_precision no tests/fsdp2_worker.py MODEL_DIR BATCHES OUT_DIR` on CPU (gloo).

`accelerate launch` turns the shipped config into the FSDP_* environment that `FullyShardedDataParallelPlugin()`
reads, and this worker shards the model with accelerate's own `fsdp2_prepare_model`, the function
`Accelerator.prepare` calls. Only the Accelerator object is replaced by the few fields that function reads:
accelerate has no FSDP on CPU (`Accelerator()` there is plain multi-CPU data parallel), while torch's `fully_shard`
runs on a gloo mesh. Each rank trains on its half of every global batch; rank 0 writes the summed losses and the
gathered final weights for the test to compare with one process. Imports come from PYTHONPATH (set by the test).
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule

from modeling_llama_hybrid import LlamaHybridForCausalLM

model_dir, batches_file, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo")  # before from_pretrained: with cpu_ram_efficient_loading only rank 0 reads weights
rank, world = dist.get_rank(), dist.get_world_size()

plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set from the config
model = LlamaHybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
accelerator_fields = SimpleNamespace(
    state=SimpleNamespace(fsdp_plugin=plugin),
    torch_device_mesh=None,
    parallelism_config=None,
    mixed_precision="no",
    is_main_process=rank == 0,
    device=torch.device("cpu"),
)
model = fsdp2_prepare_model(accelerator_fields, model)
sharded_layers = sum(isinstance(layer, FSDPModule) for layer in model.model.layers)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

losses = []
for input_ids in load_file(batches_file).values():  # one (global batch, seq_len) tensor per step, in order
    num_items = (input_ids[:, 1:] != -100).sum()  # label tokens of the whole global batch
    shard = input_ids.chunk(world)[rank]
    loss = model(input_ids=shard, labels=shard, num_items_in_batch=num_items).loss
    (loss * world).backward()  # FSDP2 averages gradients over ranks; the loss is already a share of the batch's
    optimizer.step()
    optimizer.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total)
    losses.append(total.item())

weights = {name: param.full_tensor().contiguous() for name, param in model.named_parameters()}
probe = "model.layers.0.conv.in_proj.weight"
local_shape = list(model.get_parameter(probe).to_local().shape)
if rank == 0:
    save_file(weights, out_dir / "fsdp_weights.safetensors")
    facts = {"losses": losses, "sharded_layers": sharded_layers, "plugin_version": plugin.fsdp_version}
    (out_dir / "fsdp_result.json").write_text(json.dumps({**facts, "probe": probe, "probe_local_shape": local_shape}))
dist.destroy_process_group()
