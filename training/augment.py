"""Stage 4 of the recipe, `llama-hybrid train augment`: offline data augmentation with the model itself.

Methods (pick any with `--methods`; every one is seeded, so a run is reproducible):

- `synonym`: replace words by a neighbour in the model's own input-embedding space. Only whole-word tokens take part:
  a word qualifies when " word" is a single token, and candidates are single tokens that decode to " " + letters.
  The neighbour is drawn from the `--synonym_top_k` nearest by cosine similarity (case variants of the word excluded).
  Embedding neighbours are distributional, not dictionary synonyms: they often share a role (numbers, names,
  antonyms), so keep `--synonym_prob` low.
- `delete`: drop each word with probability `--delete_prob` (at least one word stays).
- `swap`: swap `--num_swaps` random pairs of words.
- `paraphrase`: ask the model to paraphrase through its own `generate()` (the role back-translation plays in the
  article); with a chat template the request is a user turn, otherwise a plain "Paraphrase:" prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arguments import ModelArguments, parse_stage_args
from .io import read_texts, write_json, write_jsonl
from .loading import model_and_tokenizer

METHODS = ("synonym", "delete", "swap", "paraphrase")
_WORD = re.compile(r"[^\W\d_]{2,}")


@dataclass
class AugmentArguments:
    input: str = field(metadata={"help": "documents to augment (.txt blank-line separated, or .jsonl)"})
    output_dir: str = field(metadata={"help": "folder for augmented.jsonl and report.json"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"any of {METHODS}"})
    text_field: str = field(default="text")
    copies: int = field(default=1, metadata={"help": "augmented copies per document and method"})
    keep_original: bool = field(default=True, metadata={"help": "also write the original documents"})
    synonym_prob: float = field(default=0.15, metadata={"help": "share of eligible words replaced"})
    synonym_top_k: int = field(default=5, metadata={"help": "draw the replacement from this many neighbours"})
    delete_prob: float = field(default=0.1)
    num_swaps: int = field(default=2)
    max_new_tokens: int = field(default=96, metadata={"help": "longest paraphrase"})
    temperature: float = field(default=0.7)
    seed: int = field(default=0)


class EmbeddingSynonyms:
    """Cosine nearest neighbours among the whole-word tokens of a model's input embedding matrix."""

    def __init__(self, model, tokenizer, top_k: int = 5):
        self.tokenizer, self.top_k = tokenizer, top_k
        words = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.candidate_ids = torch.tensor([i for i, w in enumerate(words) if _is_word_token(w)], dtype=torch.long)
        self.candidate_words = [words[i].strip() for i in self.candidate_ids.tolist()]
        weight = model.get_input_embeddings().weight.detach().float()
        self.embeddings = torch.nn.functional.normalize(weight, dim=-1)

    def token_of(self, word: str) -> int | None:
        ids = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def neighbours(self, word: str) -> list[str]:
        token = self.token_of(word)
        if token is None or len(self.candidate_ids) == 0:
            return []
        sims = self.embeddings[self.candidate_ids] @ self.embeddings[token]
        order = sims.argsort(descending=True).tolist()
        found = []
        for i in order:
            candidate = self.candidate_words[i]
            if candidate.lower() != word.lower():
                found.append(candidate)
            if len(found) == self.top_k:
                break
        return found


def _is_word_token(decoded: str) -> bool:
    return decoded.startswith(" ") and _WORD.fullmatch(decoded[1:]) is not None


def synonym_replace(text: str, synonyms: EmbeddingSynonyms, prob: float, rng: random.Random) -> str:
    def replace(match: re.Match) -> str:
        word = match.group(0)
        if rng.random() >= prob:
            return word
        options = synonyms.neighbours(word)
        if not options:
            return word
        choice = rng.choice(options)
        return choice.capitalize() if word[0].isupper() else choice

    return _WORD.sub(replace, text)


def random_delete(text: str, prob: float, rng: random.Random) -> str:
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        kept = [w for w in words if rng.random() >= prob]
        lines.append(" ".join(kept or [rng.choice(words)]))
    return "\n".join(lines)


def random_swap(text: str, num_swaps: int, rng: random.Random) -> str:
    words = text.split(" ")
    if len(words) < 2:
        return text
    for _ in range(num_swaps):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def paraphrase_prompt(tokenizer, text: str) -> str:
    request = f"Paraphrase the following text. Reply with the paraphrase only.\n\n{text}"
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": request}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Text: {text}\nParaphrase:"


@torch.no_grad()
def paraphrase(model, tokenizer, text: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    torch.manual_seed(seed)
    prompt = paraphrase_prompt(tokenizer, text)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature else {"do_sample": False}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def augment_texts(texts: list[str], args: AugmentArguments, model=None, tokenizer=None) -> list[dict]:
    """Records `{"text", "method", "source_index"}`: originals (if kept) and every method's copies."""
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown augmentation method(s) {unknown}; choose from {list(METHODS)}")
    synonyms = EmbeddingSynonyms(model, tokenizer, args.synonym_top_k) if "synonym" in args.methods else None
    if model is not None:
        model.eval()
    records = []
    for index, text in enumerate(tqdm(texts, desc="augment", unit="doc")):
        if args.keep_original:
            records.append({"text": text, "method": "original", "source_index": index})
        for method in args.methods:
            for copy in range(args.copies):
                rng = random.Random(f"{args.seed}/{index}/{method}/{copy}")
                new = _apply(method, text, args, rng, synonyms, model, tokenizer)
                if new and new != text:
                    records.append({"text": new, "method": method, "source_index": index})
    return records


def _apply(method, text, args, rng, synonyms, model, tokenizer) -> str:
    if method == "synonym":
        return synonym_replace(text, synonyms, args.synonym_prob, rng)
    if method == "delete":
        return random_delete(text, args.delete_prob, rng)
    if method == "swap":
        return random_swap(text, args.num_swaps, rng)
    return paraphrase(model, tokenizer, text, args.max_new_tokens, args.temperature, rng.randrange(2**31))


def run_augment(model_args: ModelArguments, args: AugmentArguments) -> dict:
    texts = read_texts(args.input, args.text_field)
    model = tokenizer = None
    if {"synonym", "paraphrase"} & set(args.methods):
        model, tokenizer, description = model_and_tokenizer(model_args)
        print(f"augment: {description}")
    records = augment_texts(texts, args, model, tokenizer)
    counts = {m: sum(r["method"] == m for r in records) for m in ("original", *args.methods)}
    out = Path(args.output_dir)
    write_jsonl(out / "augmented.jsonl", records)
    report = {"documents": len(texts), "written": len(records), "per_method": counts}
    write_json(out / "report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    model_args, args = parse_stage_args("augment", [ModelArguments, AugmentArguments], argv)
    report = run_augment(model_args, args)
    for method, count in report["per_method"].items():
        print(f"{method:<11} {count:>6}")
    print(f"wrote {Path(args.output_dir) / 'augmented.jsonl'} ({report['written']} documents)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
