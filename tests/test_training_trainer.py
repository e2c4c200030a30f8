"""Trainer integration: gradient accumulation, the MoE aux term under accumulation, gradient checkpointing, offload,
and a resumed run continuing with the losses of an uninterrupted one.

Gradients are captured just before the (first) optimizer step; everything is fp32, tolerance 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pair
from datasets import Dataset
from hybrid_mixer_fixtures import VOCAB, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from llama_hybrid.training.packing import packing_collator

LENGTHS = (9, 4, 13, 6)  # unequal, so a per-micro-batch mean would weight tokens wrongly


class GradientGrabber(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def dataset(vocab: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict(
        {"input_ids": [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]}
    )


def trainer_grads(model, tmp_path, batch_size: int, accumulation: int, **extra) -> dict:
    grabber = GradientGrabber()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{batch_size}ga{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **extra,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(model.config.vocab_size),
        data_collator=packing_collator(),
        callbacks=[grabber],
    )
    trainer.train()
    return grabber.grads


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def fresh(make):
    model = make()
    model.train()
    return model


def llama_model():
    return tiny_pair(attn="sdpa")[1]


def moe_model(**overrides):
    # attention + MoE (no conv: packing across documents would leak through it, see test_training_packing.py)
    return tiny_model("sparse_full", attn="sdpa", mixer_types=["sparse_attention", "attention"], **overrides)


def moe_without_router_losses():
    return moe_model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)


@pytest.mark.parametrize("make", [llama_model, moe_without_router_losses], ids=["llama", "moe"])
def test_gradient_accumulation_matches_full_batch(make, tmp_path):
    full = trainer_grads(fresh(make), tmp_path, batch_size=4, accumulation=1)
    accumulated = trainer_grads(fresh(make), tmp_path, batch_size=1, accumulation=4)
    assert max_diff(full, accumulated) < 1e-5
    if make is moe_without_router_losses:
        assert any("experts" in name for name in full)


def test_moe_aux_term_under_accumulation_is_token_weighted_mean_of_micro_batches(tmp_path):
    """Pins the documented behaviour: CE stays exact, each micro-batch's router term is weighted by its share of the
    label tokens (so GA does not multiply it), and the total differs from the full-batch balancing loss."""
    coef = 0.5
    make = lambda: moe_model(router_aux_loss_coef=coef, router_z_loss_coef=0.0)  # noqa: E731
    accumulated = trainer_grads(fresh(make), tmp_path, batch_size=1, accumulation=4)

    model = fresh(make)
    data = dataset(model.config.vocab_size)["input_ids"]
    total_labels = sum(len(ids) - 1 for ids in data)
    loss = 0.0
    for ids in sorted(data, key=len):  # order does not matter for a sum
        x = torch.tensor([ids])
        out = model(input_ids=x, labels=x, use_cache=False)
        ce_sum = (out.loss - coef * out.aux_loss) * (len(ids) - 1)
        loss = loss + ce_sum / total_labels + coef * out.aux_loss * (len(ids) - 1) / total_labels
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert max_diff(accumulated, expected) < 1e-5

    full = trainer_grads(fresh(make), tmp_path, batch_size=4, accumulation=1)
    router = [n for n in full if n.endswith("mlp.gate.weight")]
    assert router and max((full[n] - accumulated[n]).abs().max().item() for n in router) > 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    """All mixers (compressed sparse attention, conv, attention) and an MoE FFN, in train mode."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("sparse_compressed", attn="sdpa", num_hidden_layers=3, mixer_types=[
            "sparse_attention", "conv", "attention"], mlp_layer_types=["dense", "sparse", "sparse"])  # fmt: skip
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        x = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.model.gradient_checkpointing
    assert max_diff(*grads) < 1e-5
    assert any("router" in n or n.endswith("mlp.gate.weight") for n in grads[1])


@pytest.mark.parametrize("mixer", ["attention", "sparse_compressed"])
def test_device_map_auto_with_disk_offload_gives_the_same_output(mixer, tmp_path):
    from modeling_llama_hybrid import LlamaHybridForCausalLM

    model = tiny_model(mixer, attn="sdpa")
    model.save_pretrained(tmp_path / "model")
    x = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    offloaded = LlamaHybridForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": "20KB"},
        offload_folder=str(tmp_path / "offload"),
        dtype=torch.float32,
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    with torch.no_grad():
        got = offloaded(input_ids=x).logits
    assert (got - expected).abs().max().item() < 1e-5


def losses_of_a_run(output_dir, max_steps: int, resume_from=None) -> dict[int, float]:
    rows = torch.randint(3, VOCAB, (24, 10), generator=torch.Generator().manual_seed(0)).tolist()
    model = tiny_model("sparse_compressed", seed=0).train()  # MoE + compressed sparse attention + conv
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        logging_steps=1,
        save_steps=3,
        seed=7,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume_from)
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def test_resumed_trainer_run_continues_with_the_uninterrupted_losses(tmp_path):
    uninterrupted = losses_of_a_run(tmp_path / "full", max_steps=6)
    assert (tmp_path / "full" / "checkpoint-3").is_dir()
    resumed = losses_of_a_run(tmp_path / "resumed", max_steps=6, resume_from=str(tmp_path / "full" / "checkpoint-3"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-3 come back with the checkpoint's state, 4-6 are new
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step
