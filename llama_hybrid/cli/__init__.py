"""The `llama-hybrid` command line: the application layer, the only package that imports all the others.

`main.py` builds the parser; each other module adds the subcommands of one part of the project (`train.py`:
the training recipe, `tokenizer.py`, `push.py`: the Hub, `demo.py`: the main job) and `session.py` holds a
loaded model for `generate` / `chat`.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
