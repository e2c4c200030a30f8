"""A loaded model + tokenizer that answers prompts and chat turns, streaming tokens to the terminal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import modeling_llama_hybrid  # noqa: F401  (registers LlamaHybrid with the Auto classes)
from llama_hybrid.default_model import default_model_dir
from modeling_llama_hybrid.compat import default_use_kernels

from .controls import generation_kwargs
from .options import check_device, check_dtype


@dataclass
class Reply:
    text: str  # the new text, special tokens removed, cut right after the stop string that ended it
    token_ids: list[int]  # every generated id, the final end-of-sequence token included
    finish_reason: str  # "eos", "stop_string" or "length"
    stop_string: str | None = None

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": len(self.token_ids),
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stop_string": self.stop_string,
        }


def first_stop(text: str, stop_strings: list[str]) -> tuple[int, str] | None:
    """(end of the earliest stop string in `text`, that string), or None."""
    found = [(text.find(stop) + len(stop), stop) for stop in stop_strings if stop in text]
    return min(found) if found else None


class StopAwareStreamer(TextStreamer):
    """TextStreamer that prints nothing past the stop string (the token that completes it may overhang it)."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop_strings, self.shown, self.stopped = stop_strings, "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.stopped:
            stop = first_stop(self.shown + text, self.stop_strings)
            if stop is not None:
                text, self.stopped = (self.shown + text)[len(self.shown) : stop[0]], True
            self.shown += text
            print(text, flush=True, end="")
        if stream_end:
            print(flush=True)


@dataclass
class Session:
    model: torch.nn.Module
    tokenizer: object
    generate_kwargs: dict
    stream: bool = True

    @classmethod
    def load(cls, args, source: str | None = None) -> Session:
        """The model of `source` (checked by `locate_model`; default: the embedded model) and `args`' options."""
        source = source or str(default_model_dir())
        device = check_device(args.device)
        check_dtype(args.dtype, device)
        load_kwargs = {"dtype": "auto" if args.dtype == "auto" else getattr(torch, args.dtype)}
        if args.attn_implementation:
            load_kwargs["attn_implementation"] = args.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(source, **default_use_kernels(load_kwargs)).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        torch.manual_seed(args.seed)
        kwargs = generation_kwargs(args, tokenizer)
        return cls(model, tokenizer, kwargs, stream=not getattr(args, "json", False) and args.num_beams == 1)

    @property
    def max_new_tokens(self) -> int:
        return self.generate_kwargs.get("max_new_tokens") or self.model.generation_config.max_new_tokens or 256

    @property
    def stop_strings(self) -> list[str]:
        return self.generate_kwargs.get("stop_strings") or []

    def generate(self, input_ids: torch.Tensor) -> Reply:
        """Generate from `input_ids` with the session's options, streaming to stdout unless `stream` is off."""
        streamer = StopAwareStreamer(self.tokenizer, self.stop_strings) if self.stream else None
        input_ids = input_ids.to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                tokenizer=self.tokenizer,  # stop_strings needs it
                **self.generate_kwargs,
            )
        return self._reply(output[0, input_ids.shape[1] :].tolist())

    def _reply(self, new_ids: list[int]) -> Reply:
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if new_ids and new_ids[-1] in eos_ids:
            return Reply(text, new_ids, "eos")
        stop = first_stop(text, self.stop_strings)
        if stop is not None:
            return Reply(text[: stop[0]], new_ids, "stop_string", stop[1])
        return Reply(text, new_ids, "length")

    def encode_chat(self, messages: list[dict]) -> torch.Tensor:
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]

    def respond(self, prompt: str, chat: bool = True, system: str | None = None) -> Reply:
        """Answer one prompt: in the chat template (after the `system` message, if any), or as raw text."""
        if chat and self.tokenizer.chat_template:
            messages = [{"role": "system", "content": system}] if system else []
            input_ids = self.encode_chat(messages + [{"role": "user", "content": prompt}])
        elif system:
            raise ValueError("--system needs the chat template: drop --raw (or use a model that has a chat template)")
        else:
            input_ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        self._check_fits(input_ids.shape[1])
        return self.generate(input_ids)

    def chat_turn(self, history: list[dict]) -> Reply:
        """Answer the last user turn; drop the oldest turns (never the system prompt) until the prompt fits."""
        input_ids = self.encode_chat(fit_history(history, self.encode_chat, self.context_budget))
        self._check_fits(input_ids.shape[1])
        print("bot> ", end="", flush=True)
        reply = self.generate(input_ids)
        if not self.stream:
            print(reply.text, flush=True)
        return reply

    @property
    def context_budget(self) -> int:
        return self.model.config.max_position_embeddings - self.max_new_tokens

    def _check_fits(self, prompt_tokens: int) -> None:
        context = self.model.config.max_position_embeddings
        if self.context_budget <= 0:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{context} tokens; pass a smaller --max-new-tokens"
            )
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
