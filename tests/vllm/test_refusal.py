"""A model the vLLM model cannot serve exactly is refused at load, with an error naming the setting and the way out."""

from __future__ import annotations

import pytest
from vllm_helpers import make_llm, require_vllm, save_tiny_hybrid

require_vllm()


def test_an_activation_other_than_silu_is_refused(tmp_path, smollm2_dir):
    """Every mixer kind and variant is served (tests/vllm/test_gathered_global.py serves compressed and selected
    layers); what is still refused is refused at load, naming the setting and the way out."""
    folder = save_tiny_hybrid(tmp_path / "gelu", smollm2_dir, hidden_act="gelu")
    with pytest.raises(Exception) as raised:  # in-process engines raise it as is; spawned ones wrap it
        make_llm(folder)
    message = str(raised.value)
    assert "hidden_act='gelu'" in message and "'silu'" in message and "generate()" in message, message


def test_the_vllm_model_builds_exactly_the_entries_that_do_not_refuse_it():
    from llama_hybrid.serving.support import served_mixers
    from llama_hybrid.serving.vllm_model import MIXER_BUILDERS

    assert sorted(MIXER_BUILDERS) == sorted(served_mixers())
