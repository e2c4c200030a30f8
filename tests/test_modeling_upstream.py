"""transformers' own model test suites run against LlamaHybrid, in three layouts: `ModelTesterMixin`,
`TrainingTesterMixin` (overfit a fixed batch), `TensorParallelTesterMixin` (2 CPU ranks, gloo; on 5.17 it also holds
the expert-parallel tests) and, where the version ships it (5.25), `ExpertParallelTesterMixin`; the 2-process tests
run on one layout (`runs_distributed_tests`).

The suite comes from the source distribution of the *installed* transformers (it ships `tests/`; the wheel does
not), fetched outside this clone and pointed at with an environment variable; nothing of it is copied here:

    export TRANSFORMERS_SDIST_TESTS="$(tests/fetch_transformers_tests.sh .venv/bin/python /tmp/transformers-tests)"
    python -m pytest tests/test_modeling_upstream.py -rs

Its relative imports want a package named `tests` (ours has that name), so the folder is loaded as the package
`transformers_upstream_tests` (tests/upstream_support.py, which also stands in for the modules the sdist lacks:
generation has its own equivalence tests here, test_generate.py, test_mixers_decode.py and the `fuzz`-marked tests).
A test is skipped only where it cannot apply to this model, with the reason beside it.
"""

from __future__ import annotations

import inspect
import os
import sys
import unittest
import unittest.mock
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto
from upstream_support import SDIST_TESTS_ENV, load_upstream_module, run_distributed, upstream_module_exists

from modeling_llama_hybrid import (
    LlamaHybridConfig,
    LlamaHybridForCausalLM,
    LlamaHybridForSequenceClassification,
    LlamaHybridModel,
    LlamaHybridPreTrainedModel,
    modeling_llama_hybrid,
    moe,
)

HOW_TO_FETCH = (
    f"transformers' test suite is not available: set {SDIST_TESTS_ENV} to the tests/ folder of the transformers "
    f"{transformers.__version__} source distribution, e.g. "
    f'export {SDIST_TESTS_ENV}="$(tests/fetch_transformers_tests.sh {sys.executable} /tmp/transformers-tests)"'
)


def _upstream_tests_dir() -> Path | None:
    folder = os.environ.get(SDIST_TESTS_ENV)
    if not folder or not (Path(folder) / "test_modeling_common.py").is_file():
        return None
    version_file = Path(folder).parent / "src" / "transformers" / "__init__.py"
    if version_file.is_file() and f'__version__ = "{transformers.__version__}"' not in version_file.read_text():
        pytest.skip(
            f"{SDIST_TESTS_ENV}={folder} is not the suite of the installed transformers {transformers.__version__}. "
            + HOW_TO_FETCH,
            allow_module_level=True,
        )
    return Path(folder)


_tests_dir = _upstream_tests_dir()
if _tests_dir is None:
    pytest.skip(HOW_TO_FETCH, allow_module_level=True)
pytest.importorskip("parameterized", reason="transformers' test suite needs `parameterized` (pip install -e .[dev])")
ModelTesterMixin = load_upstream_module(_tests_dir, "test_modeling_common").ModelTesterMixin
TrainingTesterMixin = load_upstream_module(_tests_dir, "test_training_mixin").TrainingTesterMixin
_tensor_parallel = load_upstream_module(_tests_dir, "test_tensor_parallel_mixin")
TensorParallelTesterMixin = _tensor_parallel.TensorParallelTesterMixin
if hasattr(_tensor_parallel, "_init_distributed"):  # 5.17 spawns its ranks itself; ours load the upstream package first
    _tensor_parallel._init_distributed = lambda tp, **_: run_distributed(world_size=tp)
if upstream_module_exists(_tests_dir, "test_expert_parallel_mixin"):  # 5.25; 5.17 keeps EP in the TP mixin
    ExpertParallelTesterMixin = load_upstream_module(_tests_dir, "test_expert_parallel_mixin").ExpertParallelTesterMixin
else:
    ExpertParallelTesterMixin = type("ExpertParallelTesterMixin", (), {})
# The suite asserts transformers' deprecation warnings (FutureWarning), which this project's pytest config ignores.
pytestmark = pytest.mark.filterwarnings("default::FutureWarning")


class LlamaHybridModelTester:
    """Builds a tiny config of one layout and random inputs (what `ModelTesterMixin` asks of a model tester)."""

    def __init__(self, parent, layout: dict):
        self.parent = parent
        self.layout = layout
        self.batch_size = 2
        self.seq_length = 9  # longer than the window and several compression blocks
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.intermediate_size = 38  # even: 5.17 cannot shard an uneven weight (5.25's uneven case is the vocab of 99)
        self.pad_token_id = 0
        self.causal_lm_class = LlamaHybridForCausalLM  # the class the training and parallel mixins run

    def get_config(self) -> LlamaHybridConfig:
        return LlamaHybridConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=64,
            pad_token_id=self.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
            **self.layout,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :3] = 0  # one left-padded row
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


LAYOUTS = {
    "llama": {},
    "conv_sparse_full_moe": dict(
        mixer_types=["conv", "sparse_attention"],
        mlp_layer_types=["sparse", "dense"],
        global_attention="full",
        sliding_window=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    ),
    "sparse_compressed_moe_shared": dict(
        mixer_types=["sparse_attention", "attention"],
        mlp_layer_types=["sparse", "sparse"],
        global_attention="compressed",
        compress_block_size=2,
        sliding_window=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        num_shared_experts=1,
    ),
}


DISTRIBUTED_ON_ONE_LAYOUT = (
    "the 2-process tests run on the conv_sparse_full_moe layout only: its plan holds every style ours uses (CI time)"
)


# The suite tells a model's role (base model, causal LM, sequence classifier: which get labels, which train) from
# transformers' own name mappings, where in-tree models are listed; a registered model is not, so list ours there
# for the duration of each test.
ROLE_MAPPINGS = (
    (modeling_auto.MODEL_MAPPING_NAMES, LlamaHybridModel),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, LlamaHybridForCausalLM),
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, LlamaHybridForSequenceClassification),
)


class LlamaHybridUpstreamTestBase(
    ModelTesterMixin, TrainingTesterMixin, TensorParallelTesterMixin, ExpertParallelTesterMixin
):
    layout: dict = {}
    model_tester = None  # set by setUp (the training and parallel mixins declare it abstract)
    all_model_classes = (LlamaHybridModel, LlamaHybridForCausalLM, LlamaHybridForSequenceClassification)
    test_all_params_have_gradient = False  # MoE: an expert no token was routed to gets no gradient

    def setUp(self):
        self.model_tester = LlamaHybridModelTester(self, self.layout)
        for names, model_class in ROLE_MAPPINGS:
            patcher = unittest.mock.patch.dict(names, {LlamaHybridConfig.model_type: model_class.__name__})
            patcher.start()
            self.addCleanup(patcher.stop)

    @unittest.skip(
        "the sdist ships no GenerationTesterMixin (tests/generation/ is absent); our own tests cover generate"
    )
    def test_generation_tester_mixin_inheritance(self):
        pass

    test_can_init_all_missing_weights_before_2023 = True  # the suite dates a model by a copyright line ours lacks

    def test_can_init_all_missing_weights(self):
        # the test loads an empty state dict: ours refuses missing weights unless the caller opts in
        load = LlamaHybridPreTrainedModel.from_pretrained.__func__

        def load_allowing_missing(cls, *args, **kwargs):
            return load(cls, *args, allow_missing_weights=True, **kwargs)

        with unittest.mock.patch.object(
            LlamaHybridPreTrainedModel, "from_pretrained", classmethod(load_allowing_missing)
        ):
            super().test_can_init_all_missing_weights()

    # transformers bounds its CI time by running the distributed tests only for its own allowlisted model types; ours
    # bounds it by layout: each test spawns 2 ranks (~20 s on 2 CPUs), so one layout per version runs them.
    runs_distributed_tests = False

    def _skip_if_tp_distributed_not_enabled(self):
        if not self.runs_distributed_tests:
            self.skipTest(DISTRIBUTED_ON_ONE_LAYOUT)

    def _skip_if_ep_distributed_not_enabled(self):
        if not self.runs_distributed_tests:
            self.skipTest(DISTRIBUTED_ON_ONE_LAYOUT)

    if hasattr(ModelTesterMixin, "test_moe_models_record_router_logits"):  # 5.25

        def test_moe_models_record_router_logits(self):
            # The suite tells an MoE model by `@use_experts_implementation` in the model class's own file; ours is
            # in moe.py (one file per mixer), so the test reads that file with it.
            get_source = inspect.getsource

            def source_with_experts(obj):
                source = get_source(obj)
                return source + get_source(moe) if obj is modeling_llama_hybrid else source

            with unittest.mock.patch.object(inspect, "getsource", source_with_experts):
                super().test_moe_models_record_router_logits()


class LlamaHybridLlamaLayoutTest(LlamaHybridUpstreamTestBase, unittest.TestCase):
    layout = LAYOUTS["llama"]


# The experts-kernel test runs wherever the model class can switch experts kernels (a class-level check, true for
# LlamaHybrid); this layout has no MoE layer, so no kernel is ever called. One generated test per dtype.
for _name in [
    name for name in dir(ModelTesterMixin) if name.startswith("test_eager_matches_batched_and_grouped_inference_")
]:
    _reason = "the llama layout has no experts: no experts kernel to compare"
    setattr(LlamaHybridLlamaLayoutTest, _name, unittest.skip(_reason)(getattr(ModelTesterMixin, _name)))
if hasattr(ModelTesterMixin, "test_output_router_logits_from_config"):  # 5.25
    LlamaHybridLlamaLayoutTest.test_output_router_logits_from_config = unittest.skip(
        "the llama layout has no MoE layer: there are no router logits to return"
    )(ModelTesterMixin.test_output_router_logits_from_config)
# 5.17's expert-parallel tests require an EP plan of every model class that can switch experts kernels (a class-level
# check); this layout has no experts to split over the ranks (5.25's EP mixin skips it for want of a plan).
for _name in [name for name in dir(TensorParallelTesterMixin) if name.startswith("test_ep_")]:
    _reason = "the llama layout has no experts: nothing to split over the ranks"
    setattr(LlamaHybridLlamaLayoutTest, _name, unittest.skip(_reason)(getattr(TensorParallelTesterMixin, _name)))


class LlamaHybridConvSparseFullMoeTest(LlamaHybridUpstreamTestBase, unittest.TestCase):
    layout = LAYOUTS["conv_sparse_full_moe"]
    runs_distributed_tests = True  # sharded attention and its gate, replicated conv, dense MLP, fused experts

    @unittest.skip("a short-conv layer has no attention weights: the suite expects one map per layer")
    def test_attention_outputs(self):
        pass


class LlamaHybridSparseCompressedMoeSharedTest(LlamaHybridUpstreamTestBase, unittest.TestCase):
    layout = LAYOUTS["sparse_compressed_moe_shared"]

    @unittest.skip("compressed global attention attends to block summaries: no (seq, seq) attention map exists")
    def test_attention_outputs(self):
        pass
