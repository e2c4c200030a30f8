"""Every Hugging Face entry point users reach for: Auto classes, pipeline, save/load, outputs, checkpointing,
device_map, sequence classification, attention backends."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA, tiny_pair
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

from modeling_llama_hybrid import (
    LlamaHybridConfig,
    LlamaHybridForCausalLM,
    LlamaHybridForSequenceClassification,
    LlamaHybridModel,
)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    _, model = tiny_pair(seed=5, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return model, folder


def test_auto_classes_resolve_to_llama_hybrid(saved_tiny):
    _, folder = saved_tiny
    assert type(AutoConfig.from_pretrained(folder)) is LlamaHybridConfig
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is LlamaHybridForCausalLM
    assert type(AutoModel.from_pretrained(folder)) is LlamaHybridModel
    assert type(AutoModelForSequenceClassification.from_pretrained(folder)) is LlamaHybridForSequenceClassification


def test_save_load_is_bit_exact(saved_tiny, tmp_path):
    model, folder = saved_tiny
    loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()  # same kernel
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids = torch.randint(3, 97, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    loaded.save_pretrained(tmp_path)  # a second round trip writes the same tensors
    first, second = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_saved_config_records_format_and_layout(saved_tiny):
    _, folder = saved_tiny
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama_hybrid" and config.config_format_version >= 1
    assert config.mixer_types == ["attention"] * 3 and config.mlp_layer_types == ["dense"] * 3
    assert config.is_plain_llama


def test_hidden_states_and_attentions_are_returned():
    llama, hybrid = tiny_pair(attn="eager")
    ids = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        ours = hybrid(ids, output_hidden_states=True, output_attentions=True)
        theirs = llama(ids, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == TINY_LLAMA["num_hidden_layers"] + 1
    assert len(ours.attentions) == TINY_LLAMA["num_hidden_layers"]
    for a, b in zip(ours.hidden_states + ours.attentions, theirs.hidden_states + theirs.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_return_dict_false_gives_tuple():
    _, hybrid = tiny_pair()
    ids = torch.randint(3, 97, (1, 6))
    out = hybrid(ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0


def test_loss_matches_llama_and_gradient_checkpointing_gives_same_grads():
    llama, hybrid = tiny_pair()
    ids = torch.randint(3, 97, (2, 12))
    expected = llama(ids, labels=ids).loss
    loss = hybrid.train()(ids, labels=ids).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in hybrid.named_parameters()}
    hybrid.zero_grad()
    hybrid.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hybrid(ids, labels=ids).loss.backward()
    for name, param in hybrid.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)


def test_num_items_in_batch_makes_loss_a_sum_over_the_whole_batch():
    _, hybrid = tiny_pair()
    ids = torch.randint(3, 97, (2, 12))
    mean = hybrid(ids, labels=ids).loss
    summed = hybrid(ids, labels=ids, num_items_in_batch=torch.tensor(22 * 2)).loss
    torch.testing.assert_close(summed, mean / 2)


def test_device_map_auto_with_disk_offload_generates_the_same(saved_tiny, tmp_path):
    model, folder = saved_tiny
    offloaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "offload")
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = torch.randint(3, 97, (1, 8))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(offloaded.generate(ids, **settings), model.generate(ids, **settings))


def test_sequence_classification_head_reads_last_real_token(saved_tiny):
    _, folder = saved_tiny
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])  # pad id 0 at the right of row 0
    with torch.no_grad():
        out = classifier(ids, labels=torch.tensor([0, 2]))
        alone = classifier(ids[:1, :3]).logits
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    torch.testing.assert_close(out.logits[:1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_attention_backends_agree_with_eager(attn):
    _, eager = tiny_pair(attn="eager")
    ids = torch.randint(3, 97, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
        eager.set_attn_implementation(attn)
        got = eager(ids, attention_mask=mask).logits
    assert eager.config._attn_implementation == attn  # no silent fallback to eager
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[0, 4:], expected[0, 4:], rtol=0, atol=1e-5)


def test_tensor_parallel_plan_covers_every_projection():
    _, hybrid = tiny_pair()
    plan = {**hybrid.config.base_model_tp_plan}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"layers.*.self_attn.{name}" in plan
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"layers.*.mlp.{name}" in plan
    assert hybrid._tp_plan["lm_head"] == "colwise_gather_output"


@pytest.mark.slow
def test_pipeline_with_chat_template_equals_generate(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    chat = [{"role": "user", "content": "Name a primary colour."}]
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    answer = generator(chat, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer["content"] == expected
    assert model.generation_config.max_new_tokens >= 128  # the pipeline default of 20 would cut answers short


def test_peft_lora_trains_only_adapters_and_merges_back():
    from peft import LoraConfig, get_peft_model

    _, hybrid = tiny_pair()
    ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        before = hybrid(ids).logits
    peft_model = get_peft_model(hybrid, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(peft_model(ids).logits, before)  # B = 0 at init: same function
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        adapted = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is LlamaHybridForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(adapted, before)


def test_trainer_runs_and_lowers_the_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    _, hybrid = tiny_pair()
    rows = torch.randint(3, 20, (16, 12)).tolist()  # a small alphabet: learnable in a few steps
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=True,
        use_cpu=True,
    )
    trainer = Trainer(model=hybrid.train(), args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < losses[0]
