"""A loaded model + tokenizer that answers prompts and chat turns, streaming tokens to the terminal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import modeling_llama_hybrid  # noqa: F401  (registers LlamaHybrid with the Auto classes)
from llama_hybrid.default_model import default_model_dir


@dataclass
class Session:
    model: torch.nn.Module
    tokenizer: object
    generate_kwargs: dict

    @classmethod
    def load(cls, args) -> Session:
        source = args.model or str(default_model_dir())
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        load_kwargs = {"dtype": "auto" if args.dtype == "auto" else getattr(torch, args.dtype)}
        if args.attn_implementation:
            load_kwargs["attn_implementation"] = args.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        torch.manual_seed(args.seed)
        kwargs = {"do_sample": args.temperature > 0}
        if args.temperature > 0:
            kwargs.update(temperature=args.temperature, top_p=args.top_p)
        if args.max_new_tokens is not None:
            kwargs["max_new_tokens"] = args.max_new_tokens
        return cls(model, tokenizer, kwargs)

    @property
    def max_new_tokens(self) -> int:
        return self.generate_kwargs.get("max_new_tokens") or self.model.generation_config.max_new_tokens or 256

    def _stream(self, input_ids: torch.Tensor) -> str:
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        input_ids = input_ids.to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **self.generate_kwargs
            )
        return self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

    def encode_chat(self, messages: list[dict]) -> torch.Tensor:
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]

    def respond(self, prompt: str, chat: bool = True) -> str:
        if chat and self.tokenizer.chat_template:
            input_ids = self.encode_chat([{"role": "user", "content": prompt}])
        else:
            input_ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        self._check_fits(input_ids.shape[1])
        return self._stream(input_ids)

    def chat_turn(self, history: list[dict]) -> str:
        """Answer the last user turn; drop the oldest turns (never the system prompt) until the prompt fits."""
        input_ids = self.encode_chat(fit_history(history, self.encode_chat, self.context_budget))
        self._check_fits(input_ids.shape[1])
        print("bot> ", end="", flush=True)
        return self._stream(input_ids)

    @property
    def context_budget(self) -> int:
        return self.model.config.max_position_embeddings - self.max_new_tokens

    def _check_fits(self, prompt_tokens: int) -> None:
        if prompt_tokens > self.context_budget:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens; with max_new_tokens={self.max_new_tokens} the model's "
                f"context of {self.model.config.max_position_embeddings} leaves room for {self.context_budget}"
            )


def fit_history(history: list[dict], encode, budget: int) -> list[dict]:
    """Oldest non-system messages removed until `encode(messages)` fits in `budget` tokens.

    The last user message is always kept (if it alone is too long, the caller reports it).
    """
    system = [m for m in history[:1] if m["role"] == "system"]
    turns = history[len(system) :]
    while len(turns) > 1 and encode(system + turns).shape[1] > budget:
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
    return system + turns
