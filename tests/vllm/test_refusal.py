"""A model the vLLM model cannot serve exactly is refused at load, with an error naming the layers and the way out."""

from __future__ import annotations

import pytest
from vllm_helpers import make_llm, require_vllm, save_tiny_hybrid

require_vllm()


def test_compressed_global_attention_is_refused(tmp_path, smollm2_dir):
    folder = save_tiny_hybrid(
        tmp_path / "compressed", smollm2_dir, global_attention="compressed", compress_block_size=4
    )
    with pytest.raises(Exception) as raised:  # in-process engines raise it as is; spawned ones wrap it
        make_llm(folder)
    message = str(raised.value)
    assert "layers [1, 3]" in message and "global_attention='compressed'" in message, message
    assert "global_attention='full'" in message and "generate" in message, message


def test_the_vllm_model_builds_exactly_the_entries_that_do_not_refuse_it():
    from llama_hybrid.serving.support import served_mixers
    from llama_hybrid.serving.vllm_model import MIXER_BUILDERS

    assert sorted(MIXER_BUILDERS) == sorted(served_mixers())
