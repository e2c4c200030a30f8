"""The compressed cache of compressed sparse attention layers (compressed_cache.py).

Layer level: the cache's window + summaries, attended with the layer's kernels, give exactly the branches a naive
per-query reference computes from the whole sequence, whatever the update sizes (prefill, chunks, one token),
with left padding, packed documents and rolled-back (cropped) tokens; its stored bytes are O(W + n/b).
Model level: cached decode == full forward over sequences >> W, and generate() keeps every decoding mode exact.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from modeling_llama_hybrid.attention import repeat_kv
from modeling_llama_hybrid.banded_attention import banded_window_attention
from modeling_llama_hybrid.compressed_cache import CompressedSparseLayer, StaticCompressedSparseLayer
from modeling_llama_hybrid.rotary import rotate_keys

DIM = 8


def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaMA RoPE tables (B, N, D) at `positions` (B, N)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, DIM, 2).float() / DIM))
    angles = positions.clamp(min=0).float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def attend(query, keys, values):
    return torch.softmax(keys @ query / DIM**0.5, 0) @ values


def naive_branches(query, raw_key, value, positions, valid, window, block):
    """Local and global branch outputs (B, T, H, D) query by query from the definitions (one document per span
    of consecutive positions; global falls back to local where no block is complete)."""
    batch, heads, length, _ = query.shape
    groups = heads // raw_key.shape[1]
    local, glob = torch.zeros(batch, length, heads, DIM), torch.zeros(batch, length, heads, DIM)
    for row in range(batch):
        cos, sin = rotary(positions[row : row + 1])
        q_rot = rotate_keys(query[row : row + 1], cos, sin)[0]
        k_rot = rotate_keys(raw_key[row : row + 1], cos, sin)[0]
        doc, docs = 0, []
        for s in range(length):
            starts = valid[row, s] and (
                s == 0 or not valid[row, s - 1] or positions[row, s] != positions[row, s - 1] + 1
            )
            doc += int(starts)
            docs.append(doc if valid[row, s] else -1)
        for t in range(length):
            if not valid[row, t]:
                continue
            mine = [s for s in range(t + 1) if docs[s] == docs[t]]
            keys = [s for s in mine if t - s < window]
            pos_t = int(positions[row, t])
            blocks = sorted({int(positions[row, s]) // block for s in mine})
            visible = [j for j in blocks if (j + 1) * block - 1 <= pos_t]
            for h in range(heads):
                g = h // groups
                local[row, t, h] = attend(q_rot[h, t], k_rot[g, keys], value[row, g, keys])
                if not visible:
                    glob[row, t, h] = local[row, t, h]
                    continue
                summary_keys, summary_values = [], []
                for j in visible:
                    members = [s for s in mine if int(positions[row, s]) // block == j]
                    c, s_ = rotary(torch.tensor([[j * block]]))
                    mean_key = raw_key[row : row + 1, g : g + 1, members].mean(2, keepdim=True)
                    summary_keys.append(rotate_keys(mean_key, c, s_)[0, 0, 0])
                    summary_values.append(value[row, g, members].mean(0))
                glob[row, t, h] = attend(q_rot[h, t], torch.stack(summary_keys), torch.stack(summary_values))
    return local, glob


def cached_branches(layer, query, raw_key, value, positions, valid):
    """Both branches (B, T, H, D) through `layer`, one update of the given length at a time, as the model does."""
    step = layer.open_tokens(positions, valid, rotary)
    cos, sin = rotary(positions)
    q_rot, k_rot = rotate_keys(query, cos, sin), rotate_keys(raw_key, cos, sin)
    window_keys, window_values, summary_keys, summary_values = layer.update_compressed(raw_key, k_rot, value)
    local = banded_window_attention(q_rot, window_keys, window_values, step.window, DIM**-0.5)
    groups = query.shape[1] // summary_keys.shape[1]
    scores = (q_rot @ repeat_kv(summary_keys, groups).transpose(-1, -2)) * DIM**-0.5
    scores = scores.masked_fill(~step.visible[:, None], torch.finfo(torch.float32).min)
    glob = (scores.softmax(-1) @ repeat_kv(summary_values, groups)).transpose(1, 2)
    return local, torch.where(step.visible.any(-1)[:, :, None, None], glob, local)


def run_in_chunks(layer, tensors, positions, valid, chunks):
    outs, start = [], 0
    for size in chunks:
        span = slice(start, start + size)
        q, k, v = (t[:, :, span] for t in tensors)
        outs.append(cached_branches(layer, q, k, v, positions[:, span], valid[:, span]))
        start += size
    return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)


def sequence(batch=2, heads=4, kv_heads=2, length=30, left_pad=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = tuple(torch.randn(batch, h, length, DIM, generator=generator) for h in (heads, kv_heads, kv_heads))
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[-1, :left_pad] = False
    positions = torch.where(valid, valid.long().cumsum(1) - 1, 1)  # generate()'s positions: padding at 1
    return tensors, positions, valid


CHUNKINGS = {"prefill": [30], "prefill_then_tokens": [7] + [1] * 23, "mixed": [9, 5, 1, 1, 14], "tokens": [1] * 30}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("chunks", list(CHUNKINGS))
@pytest.mark.parametrize(("window", "block"), [(5, 3), (3, 4), (1, 2), (4, 1)])
def test_cache_branches_match_naive_reference(window, block, chunks, static):
    """b not dividing W, b > W, W = 1, b = 1; left padding in the last row; every update size."""
    tensors, positions, valid = sequence()
    expected = naive_branches(*tensors, positions, valid, window, block)
    layer = StaticCompressedSparseLayer(window, block, 30) if static else CompressedSparseLayer(window, block)
    local, glob = run_in_chunks(layer, tensors, positions, valid, CHUNKINGS[chunks])
    torch.testing.assert_close(local[valid], expected[0][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(glob[valid], expected[1][valid], atol=1e-5, rtol=0)


def test_packed_documents_in_one_update_then_decode():
    """A prefill holding two documents (positions restart), then tokens continuing the second one."""
    tensors, _, _ = sequence(batch=1, length=30, left_pad=0, seed=2)
    positions = torch.cat([torch.arange(14), torch.arange(16)])[None]
    valid = torch.ones(1, 30, dtype=torch.bool)
    first = naive_branches(*(t[:, :, :14] for t in tensors), positions[:, :14], valid[:, :14], 5, 3)
    second = naive_branches(*(t[:, :, 14:] for t in tensors), positions[:, 14:], valid[:, 14:], 5, 3)
    local, glob = run_in_chunks(CompressedSparseLayer(5, 3), tensors, positions, valid, [20, 3, 1, 1, 1, 4])
    torch.testing.assert_close(local, torch.cat([first[0], second[0]], 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(glob, torch.cat([first[1], second[1]], 1), atol=1e-5, rtol=0)


def test_crop_then_continue_equals_never_adding_the_tokens():
    """Recorded candidates (as assisted decoding adds them) rolled back by `crop` leave no trace."""
    window, block = 5, 3
    tensors, positions, valid = sequence(length=40, seed=1)
    expected = naive_branches(*tensors, positions, valid, window, block)
    junk_tensors, _, _ = sequence(length=6, seed=9)
    ones = torch.ones(2, 6, dtype=torch.bool)
    layer = CompressedSparseLayer(window, block)
    parts = [run_in_chunks(layer, [t[:, :, :20] for t in tensors], positions[:, :20], valid[:, :20], [20])]
    layer.activate_past_recording()
    run_in_chunks(layer, junk_tensors, positions[:, 19:20] + 1 + torch.arange(6), ones, [2, 4])
    layer.crop(-6)
    span = slice(20, 23)
    parts.append(run_in_chunks(layer, [t[:, :, span] for t in tensors], positions[:, span], valid[:, span], [3]))
    layer.crop(0)
    junk = [t[:, :, :2] for t in junk_tensors]
    run_in_chunks(layer, junk, positions[:, 22:23] + 1 + torch.arange(2), ones[:, :2], [2])
    layer.crop(-2)
    rest = [t[:, :, 23:] for t in tensors]
    parts.append(run_in_chunks(layer, rest, positions[:, 23:], valid[:, 23:], [1] * 17))
    local, glob = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    torch.testing.assert_close(local[valid], expected[0][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(glob[valid], expected[1][valid], atol=1e-5, rtol=0)


def test_crop_without_recording_is_refused():
    tensors, positions, valid = sequence(length=12)
    layer = CompressedSparseLayer(5, 3)
    run_in_chunks(layer, tensors, positions, valid, [12])
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        layer.crop(-2)
    layer.crop(0)  # nothing to remove: allowed
    static = StaticCompressedSparseLayer(5, 3, 12)
    run_in_chunks(static, tensors, positions, valid, [12])
    with pytest.raises(RuntimeError, match="dynamic"):
        static.crop(-1)


def test_an_update_without_its_step_is_refused():
    """A layer called outside the model (no step opened, or a stale one for other tokens) says so, never reuses it."""
    tensors, positions, valid = sequence(length=6)
    layer = CompressedSparseLayer(5, 3)
    raw_key, value = tensors[1], tensors[2]
    with pytest.raises(RuntimeError, match="needs the step of this forward"):
        layer.update_compressed(raw_key, raw_key, value)
    layer.open_tokens(positions[:, :4], valid[:, :4], rotary)
    with pytest.raises(RuntimeError, match="needs the step of this forward"):
        layer.update_compressed(raw_key, raw_key, value)  # 6 tokens against a step of 4


@pytest.mark.parametrize("length", [1, 2, 3, 47, 48, 100])
def test_stored_bytes_are_window_plus_summaries_plus_open_block(length):
    """After n tokens: (W - 1) + (b - 1) + floor(n / b) key/value slots per row and head, plus 4 per-row integers
    and one block number per summary: O(W + n/b), not O(n)."""
    window, block, batch, kv_heads = 16, 3, 2, 2
    tensors, positions, valid = sequence(batch, 4, kv_heads, length, left_pad=0)
    layer = CompressedSparseLayer(window, block)
    run_in_chunks(layer, tensors, positions, valid, [length // 2 or 1] + [1] * (length - (length // 2 or 1)))
    summaries = length // block
    slots = (window - 1) + (block - 1) + summaries
    expected = 2 * slots * batch * kv_heads * DIM * 4 + (3 * batch + summaries * batch) * 8
    assert layer.stored_bytes() == expected
    assert layer.get_seq_length() == length


def test_beam_reorder_and_batch_select_follow_rows():
    tensors, positions, valid = sequence(length=20)
    layer = CompressedSparseLayer(5, 3)
    run_in_chunks(layer, tensors, positions, valid, [20])
    alone = CompressedSparseLayer(5, 3)
    run_in_chunks(alone, [t[1:] for t in tensors], positions[1:], valid[1:], [20])
    layer.reorder_cache(torch.tensor([1, 1]))
    held = int(alone.num_summaries[0])  # the batch's summary buffer is as wide as its fullest row
    for name in layer.batch_tensors():
        mine, theirs = getattr(layer, name)[0], getattr(alone, name)[0]
        if name.startswith("summary"):  # (KV, G, D) or (G,)
            mine, theirs = (t[:, :held] if t.ndim == 3 else t[:held] for t in (mine, theirs))
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.batch_size == 1 and layer.last_position.shape == (1,)


# ----------------------------------------------------------------------------------------------------------------
# Model level: the compressed cache is what a compressed model decodes with, and it is exact

WINDOW, BLOCK = 4, 3  # b does not divide W


def compressed_model(attn: str = "sdpa", seed: int = 0):
    from hybrid_mixer_fixtures import tiny_model

    return tiny_model("sparse_compressed", attn, seed=seed, sliding_window=WINDOW, compress_block_size=BLOCK)


def fresh_cache(kind: str, model, length: int):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=length + 2)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("length", [4 * WINDOW + 1, 16 * WINDOW + 2])  # partial last blocks
@torch.no_grad()
def test_decode_token_by_token_matches_full_forward(length, attn, cache_kind):
    """Prefill, a multi-token update (chunked prefill / candidates), then one token at a time, left padding in
    row 1: every position's logits equal the full forward's."""
    from hybrid_mixer_fixtures import tokens

    model = compressed_model(attn)
    ids = tokens(2, length)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = model(ids, attention_mask=mask).logits
    cache = fresh_cache(cache_kind, model, length)
    cuts = [0, 5, 12, *range(13, length + 1)]
    logits = [
        model(ids[:, a:b], attention_mask=mask[:, :b], cache=cache, use_cache=True).logits
        for a, b in itertools.pairwise(cuts)
    ]
    expected_class = CompressedSparseLayer if cache_kind == "dynamic" else StaticCompressedSparseLayer
    assert type(cache.layers[0]) is expected_class
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[valid], full[valid], atol=1e-5, rtol=0)


@torch.no_grad()
def test_crop_then_continue_equals_never_generating_the_cropped_tokens():
    from hybrid_mixer_fixtures import tokens
    from transformers import DynamicCache

    model = compressed_model()
    ids = tokens(2, 40)
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    model(ids[:, :17], cache=cache)
    cache.activate_past_recording()
    model(tokens(2, 6, seed=7), cache=cache)  # rejected candidates
    cache.crop(-6)
    rest = model(ids[:, 17:], cache=cache).logits
    torch.testing.assert_close(rest, full[:, 17:], atol=1e-5, rtol=0)


def greedy(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 20)  # ends far beyond the window and several blocks
    return model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)


@torch.no_grad()
def test_generate_modes_with_the_compressed_cache_equal_no_cache():
    from hybrid_mixer_fixtures import tokens

    model = compressed_model()
    model.generation_config.eos_token_id = None
    ids = torch.cat([tokens(1, 6), tokens(1, 6)], dim=1)  # a repeated prompt gives prompt lookup candidates
    reference = greedy(model, ids, use_cache=False)
    out = greedy(model, ids, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert type(cache.layers[0]) is CompressedSparseLayer  # generate() built it, no user code
    assert torch.equal(greedy(model, ids, cache_implementation="static"), reference)
    assert torch.equal(greedy(model, ids, prompt_lookup_num_tokens=3), reference)
    assert torch.equal(greedy(model, ids, assistant_model=compressed_model(seed=5)), reference)
    beams = greedy(model, ids, num_beams=3)
    assert torch.equal(beams, greedy(model, ids, num_beams=3, use_cache=False))
    assert torch.equal(beams, greedy(model, ids, num_beams=3, cache_implementation="static"))
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        sampled.append(model.generate(ids, do_sample=True, max_new_tokens=20, pad_token_id=0, use_cache=use_cache))
    assert torch.equal(*sampled)


@torch.no_grad()
def test_continuing_from_a_returned_cache_equals_one_forward():
    from hybrid_mixer_fixtures import tokens

    model = compressed_model()
    model.generation_config.eos_token_id = None
    ids = tokens(1, 9)
    out = greedy(model, ids, max_new_tokens=15, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    follow = tokens(1, 4, seed=4)
    # the cache holds every token but the last generated one, which the next forward brings
    tail = torch.cat([out.sequences[:, -1:], follow], 1)
    logits = model(tail, cache=cache).logits
    full = model(torch.cat([out.sequences, follow], 1)).logits
    torch.testing.assert_close(logits, full[:, -tail.shape[1] :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@torch.no_grad()
def test_left_padded_batch_generates_like_single_rows(cache_implementation):
    from hybrid_mixer_fixtures import tokens

    model = compressed_model()
    model.generation_config.eos_token_id = None
    rows = [tokens(1, 11, seed=3)[0], tokens(1, 5, seed=4)[0], tokens(1, 8, seed=5)[0]]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    batch = greedy(model, ids, attention_mask=mask, cache_implementation=cache_implementation)
    for i, row in enumerate(rows):
        alone = greedy(model, row[None], cache_implementation=cache_implementation)
        assert torch.equal(batch[i, width:], alone[0, len(row) :]), f"row {i} differs"
