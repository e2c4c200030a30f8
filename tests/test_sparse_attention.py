"""Gated global + local sparse attention against plain references (the identities listed under "Sparse attention" in
docs/architecture.md)."""

from __future__ import annotations

import pytest
import torch
from hybrid_mixer_fixtures import tiny_config, tiny_model, tokens

from modeling_llama_hybrid import LlamaHybridForCausalLM
from modeling_llama_hybrid.masks import build_masks
from modeling_llama_hybrid.rotary import rotate_half


def set_gate(model, alpha: float, bias: float | None = None) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("branch_gate.alpha"):
                param.fill_(alpha)
            elif bias is not None and name.endswith("branch_gate.bias"):
                param.fill_(bias)


def as_plain_attention(model, **overrides) -> LlamaHybridForCausalLM:
    """The same weights in a model whose sparse layers are full attention (branch gates dropped)."""
    config = model.config.to_dict()
    config.update(overrides)
    sparse = set(model.config.layers_of("sparse_attention"))
    config["mixer_types"] = ["attention" if i in sparse else m for i, m in enumerate(config["mixer_types"])]
    config["global_attention"] = "full"  # no sparse layer is left to have a global branch
    plain = LlamaHybridForCausalLM(type(model.config)(**{k: v for k, v in config.items() if k != "layer_types"}))
    plain.config._attn_implementation = model.config._attn_implementation
    state = {k: v for k, v in model.state_dict().items() if "branch_gate" not in k}
    plain.load_state_dict(state)
    return plain.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_gate_fully_global_is_full_causal_attention(attn):
    model = tiny_model("sparse_full", attn)
    set_gate(model, alpha=0.0)  # g = 1 exactly
    ids = tokens(2, 11)
    torch.testing.assert_close(model(ids).logits, as_plain_attention(model)(ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_window_covering_the_sequence_is_full_attention(attn):
    model = tiny_model("sparse_full", attn, sliding_window=64)  # any gate: both branches see the same keys
    ids = tokens(2, 11)
    torch.testing.assert_close(model(ids).logits, as_plain_attention(model)(ids).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Layer-level checks against a naive per-query reference (loops over batch, head and query)


def rope(x, cos, sin):  # x (T, D), cos/sin (T, D)
    return x * cos + rotate_half(x) * sin


def documents(positions, valid):
    """Document id per slot: a new document starts where a valid position does not continue the previous one."""
    doc, ids, prev = 0, [], None
    for pos, ok in zip(positions.tolist(), valid.tolist(), strict=True):
        if ok and (prev is None or pos != prev + 1):
            doc += 1
        ids.append(doc if ok else -1)
        prev = pos if ok else None
    return ids


def naive_sparse_layer(attn, hidden, positions, valid, rotary, global_attention):
    """o_proj(g * global + (1 - g) * local) computed query by query from the definitions."""
    cfg = attn.config
    batch, length, _ = hidden.shape
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    window, block = cfg.sliding_window, cfg.compress_block_size
    q = attn.q_proj(hidden).view(batch, length, heads, dim)
    k = attn.k_proj(hidden).view(batch, length, kv_heads, dim)
    v = attn.v_proj(hidden).view(batch, length, kv_heads, dim)
    gate_logits = torch.nn.functional.linear(hidden, attn.branch_gate.weight, attn.branch_gate.bias)
    gate = 1 - attn.branch_gate.alpha * torch.sigmoid(gate_logits)  # (B, T, H)
    out = torch.zeros(batch, length, heads, dim)
    for b in range(batch):
        cos, sin = rotary(hidden[b : b + 1], positions[b : b + 1])
        cos, sin = cos[0], sin[0]
        doc = documents(positions[b], valid[b])
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            qr = rope(q[b, :, h], cos, sin)
            kr = rope(k[b, :, kvh], cos, sin)
            for t in range(length):
                keys = [s for s in range(length) if valid[b, s] and s <= t and doc[s] == doc[t]]
                local_keys = [s for s in keys if s > t - window]
                local = attend(qr[t], kr[local_keys], v[b, local_keys, kvh], dim) if local_keys else torch.zeros(dim)
                if global_attention == "full":
                    glob = attend(qr[t], kr[keys], v[b, keys, kvh], dim) if keys else torch.zeros(dim)
                else:
                    glob = naive_compressed(qr[t], k[b, :, kvh], v[b, :, kvh], positions[b], keys, t, block, rotary)
                    glob = local if glob is None else glob
                out[b, t, h] = gate[b, t, h] * glob + (1 - gate[b, t, h]) * local
    return attn.o_proj(out.reshape(batch, length, -1))


def naive_compressed(query, raw_keys, values, positions, keys, t, block, rotary):
    """Attention over mean-pooled pre-RoPE blocks j with (j + 1) * b - 1 <= position(t); None if there is none."""
    by_block = {}
    for s in keys:
        by_block.setdefault(int(positions[s]) // block, []).append(s)
    visible = [j for j in sorted(by_block) if (j + 1) * block - 1 <= int(positions[t])]
    if not visible:
        return None
    summary_positions = torch.tensor([[j * block for j in visible]])
    cos, sin = rotary(raw_keys[None], summary_positions)
    summary_keys = rope(torch.stack([raw_keys[by_block[j]].mean(0) for j in visible]), cos[0], sin[0])
    summary_values = torch.stack([values[by_block[j]].mean(0) for j in visible])
    return attend(query, summary_keys, summary_values, query.shape[-1])


def attend(query, keys, values, dim):
    weights = torch.softmax(keys @ query / dim**0.5, dim=0)
    return weights @ values


def run_layer(model, hidden, attention_mask, position_ids):
    masks = build_masks(model.config, hidden, attention_mask, None, position_ids, model.model.rotary_emb)
    rotary = model.model.rotary_emb(hidden, position_ids)
    layer = model.model.layers[0]
    return layer.self_attn(hidden, rotary, masks[layer.mask_kind])[0]


CASES = {
    "plain": (None, None),
    "left_padded": ("left", None),
    "packed": (None, "packed"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("global_attention", ["compressed", "full"])
@torch.no_grad()
def test_sparse_layer_matches_naive_reference(global_attention, attn, case):
    """Includes the first queries that see no complete block (global falls back to local, no NaN)."""
    mixer = "sparse_compressed" if global_attention == "compressed" else "sparse_full"
    model = tiny_model(mixer, attn, compress_block_size=4, sliding_window=3)
    batch, length = 2, 13
    hidden = torch.randn(batch, length, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    padding, packing = CASES[case]
    attention_mask = None
    position_ids = torch.arange(length)[None].expand(batch, -1)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if padding:
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[1, :5] = 0
        valid = attention_mask.bool()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if packing:  # one row holding documents of 6 and 7 tokens; positions restart
        batch = 1
        hidden, valid = hidden[:1], valid[:1]
        position_ids = torch.cat([torch.arange(6), torch.arange(7)])[None]
    out = run_layer(model, hidden, attention_mask, position_ids)
    expected = naive_sparse_layer(
        model.model.layers[0].self_attn, hidden, position_ids, valid, model.model.rotary_emb, global_attention
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixer", ["sparse_full", "sparse_compressed"])
@torch.no_grad()
def test_gate_fully_local_is_the_pure_window(mixer):
    model = tiny_model(mixer, "sdpa")
    set_gate(model, alpha=1.0, bias=100.0)  # sigmoid(100) == 1 in fp32: g = 0 exactly
    hidden = torch.randn(2, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(11)[None].expand(2, -1)
    attn = model.model.layers[0].self_attn
    out = run_layer(model, hidden, None, positions)
    assert torch.all(attn.branch_gate(hidden) == 0)
    valid = torch.ones(2, 11, dtype=torch.bool)
    # the naive reference with g = 0 is the sliding window alone, whatever the global branch
    expected = naive_sparse_layer(attn, hidden, positions, valid, model.model.rotary_emb, "full")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixer", ["sparse_full", "sparse_compressed"])
def test_gate_learns_from_exact_init_and_gradients_are_finite(mixer):
    """alpha = 0 (exact upcycling) still gives alpha a gradient; the empty-block fallback never makes NaN."""
    model = tiny_model(mixer, "eager", compress_block_size=5)
    set_gate(model, alpha=0.0)
    model.train()
    ids = tokens(2, 9)
    model(ids, labels=ids).loss.backward()
    alpha = model.model.layers[0].self_attn.branch_gate.alpha
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_fresh_gate_starts_at_config_init():
    config = tiny_config("sparse_full", sparse_gate_init=0.0)
    model = LlamaHybridForCausalLM(config)
    assert torch.all(model.model.layers[0].self_attn.branch_gate.alpha == 0)


@pytest.fixture
def own_compile_caches():
    """Flex compiles are process-wide: a test compiling other shapes turns later tests' kernels dynamic (which CPU
    inductor in torch 2.13 miscompiles for transformers' window kernel) and spends their recompile budget."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_layer_under_flex_matches_naive_reference(case, own_compile_caches):
    """The FlexAttention path (a BlockMask of the block summaries, see tests/test_sparse_flex.py) against the same
    per-query reference as the eager and sdpa paths (forward only: CPU FlexAttention has no backward)."""
    test_sparse_layer_matches_naive_reference("compressed", "flex_attention", case)
