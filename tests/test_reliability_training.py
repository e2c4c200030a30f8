"""Issue 9, training state: a resumed Trainer run continues with the losses of an uninterrupted one; packed documents
never see each other through the short conv (position-id resets or `seq_idx`)."""

from __future__ import annotations

import pytest
import torch
from hybrid_mixer_fixtures import VOCAB, tiny_model
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from modeling_llama_hybrid.short_conv import document_taps, short_conv_packed, short_conv_reference


def train(output_dir, max_steps: int, resume_from=None) -> dict[int, float]:
    from datasets import Dataset

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
    uninterrupted = train(tmp_path / "full", max_steps=6)
    assert (tmp_path / "full" / "checkpoint-3").is_dir()
    resumed = train(tmp_path / "resumed", max_steps=6, resume_from=str(tmp_path / "full" / "checkpoint-3"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-3 come back with the checkpoint's state, 4-6 are new
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


DOCS = [[5, 9, 14, 3, 22], [7, 31, 8], [40, 12, 6, 19, 27, 33]]


@pytest.mark.parametrize("by", ["position_ids", "seq_idx"])
@torch.no_grad()
def test_conv_layers_keep_packed_documents_apart(by):
    model = tiny_model("conv", "sdpa", conv_kernel_size=4)
    collator = DataCollatorWithFlattening(return_position_ids=True, return_seq_idx=True)
    batch = collator([{"input_ids": d} for d in DOCS])
    kwargs = {"position_ids": batch["position_ids"]}
    if by == "seq_idx":  # documents named only by seq_idx: positions run on as in one long row
        kwargs = {"seq_idx": batch["seq_idx"], "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
        model = tiny_model("conv", "sdpa", mixer_types=["conv", "conv"])  # no attention: only the conv could leak
    packed = model(batch["input_ids"], use_cache=False, **kwargs).logits[0]
    separate = torch.cat([model(torch.tensor([d]), use_cache=False).logits[0] for d in DOCS])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)


def test_document_taps_and_plain_positions_agree_with_the_reference_conv():
    generator = torch.Generator().manual_seed(0)
    gated, weight, bias = torch.randn(2, 5, 9, generator=generator), torch.randn(5, 3), torch.randn(5)
    positions = torch.arange(9)[None]
    taps = document_taps(positions, None, 9, 3)
    assert taps.all(dim=-1)[0, 2:].all() and not taps[0, 0, :2].any()
    torch.testing.assert_close(
        short_conv_packed(gated, weight, bias, taps), short_conv_reference(gated, weight, bias), atol=1e-6, rtol=0
    )
    restarted = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    taps = document_taps(restarted, None, 9, 3)
    assert taps[0, 4].tolist() == [False, False, True] and taps[0, 5].tolist() == [False, True, True]
