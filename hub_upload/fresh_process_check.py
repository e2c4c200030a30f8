"""Load a Hub folder the way a user without llama-hybrid installed would, and compare with the reference.

`verify.py` runs this file's text in a fresh interpreter (`python -c SOURCE SPEC_JSON`). It must import nothing
from this project: before transformers is imported, a meta-path finder makes `llama_hybrid` and
`modeling_llama_hybrid` unimportable (the package is usually installed, editable, in the same environment), and
the check asserts both that they fail to import and that the model class came from the folder's own code.

SPEC_JSON: {"folder", "reference" (safetensors: input_ids, attention_mask, logits, generated), "tolerance",
"chat_template", "prompt", "repo_id" (optional: also load by repo id from the offline Hub cache in HF_HUB_CACHE)}.
The last stdout line is `RESULT {json}`; any failure exits non-zero with the reason on stderr.
"""

import importlib.abc
import json
import sys

BLOCKED_PACKAGES = ("llama_hybrid", "modeling_llama_hybrid")


class RefuseProjectPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED_PACKAGES:
            raise ModuleNotFoundError(f"{fullname} is hidden: this check runs as if llama-hybrid were not installed")
        return None


def hide_project_packages():
    sys.meta_path.insert(0, RefuseProjectPackages())
    for name in BLOCKED_PACKAGES:
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        fail(f"could not hide {name}: it still imports, so the check would not be real")


def fail(message):
    print(f"fresh-process check failed: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_no_project_modules():
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED_PACKAGES)
    if leaked:
        fail(f"project modules were imported: {leaked}")


def encode(tokenizer, spec):
    if spec["chat_template"] is not None:
        if tokenizer.chat_template != spec["chat_template"]:
            fail("the saved tokenizer's chat template differs from the source's")
        messages = [{"role": "user", "content": spec["prompt"]}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(spec["prompt"], return_tensors="pt")


def compare(model, tokenizer, reference, spec, where, generate=True):
    import torch

    if "transformers_modules" not in type(model).__module__:
        fail(f"{where}: {type(model).__module__}.{type(model).__name__} is not the folder's remote code")
    inputs = encode(tokenizer, spec)
    if not torch.equal(inputs["input_ids"], reference["input_ids"]):
        fail(f"{where}: the tokenizer encodes the prompt differently from the source tokenizer")
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    diff = (logits - reference["logits"]).abs().max().item()
    if not diff <= spec["tolerance"]:
        fail(f"{where}: logits differ from the in-process model by {diff:.3g} (tolerance {spec['tolerance']:.3g})")
    if not generate:
        return diff, None
    generated = model.generate(**inputs, max_new_tokens=reference["generated"].shape[1], do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    if not torch.equal(new_tokens, reference["generated"][:, : new_tokens.shape[1]]):
        fail(
            f"{where}: greedy generate gave {new_tokens.tolist()}, the in-process model {reference['generated'].tolist()}"
        )
    return diff, tokenizer.decode(new_tokens[0], skip_special_tokens=True)


def check_hub_cache(repo_id, reference, spec):
    """Load by repo id from the Hub cache (HF_HUB_OFFLINE=1): the path a user of the uploaded repo takes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

    config = AutoConfig.from_pretrained(repo_id, trust_remote_code=True)
    if config.model_type != "llama_hybrid" or "transformers_modules" not in type(config).__module__:
        fail(f"AutoConfig by repo id gave {type(config).__module__}.{type(config).__name__}")
    tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True, dtype="auto").eval()
    diff, _ = compare(model, tokenizer, reference, spec, f"repo id {repo_id}", generate=False)  # pipeline generates
    generator = pipeline("text-generation", model=repo_id, trust_remote_code=True, dtype="auto")
    text = generator(spec["prompt"], max_new_tokens=4, do_sample=False)[0]["generated_text"]
    if not isinstance(text, str) or not text.startswith(spec["prompt"]):
        fail(f"pipeline('text-generation') by repo id returned {text!r}")
    return diff


def main():
    spec = json.loads(sys.argv[1])
    hide_project_packages()

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = load_file(spec["reference"])
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], trust_remote_code=True, dtype="auto").eval()
    diff, text = compare(model, tokenizer, reference, spec, "folder")
    result = {"max_abs_logit_diff": diff, "generated_text": text, "hub_cache_max_abs_logit_diff": None}
    if spec.get("repo_id"):
        result["hub_cache_max_abs_logit_diff"] = check_hub_cache(spec["repo_id"], reference, spec)
    check_no_project_modules()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
