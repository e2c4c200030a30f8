"""Publishing to the Hugging Face Hub: build a folder that loads with `trust_remote_code=True`, verify it in a
fresh process without this package, upload it (`llama-hybrid push`).

Names are imported on first use, so `llama-hybrid --help` does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "push": "publish",
    "PushReport": "publish",
    "HubUploadError": "publish",
    "resolve_token": "publish",
    "load_model_dir": "folder",
    "write_hub_folder": "folder",
    "check_shippable": "folder",
    "auto_map": "folder",
    "modeling_source_files": "folder",
    "ShippedFile": "folder",
    "build_model_card": "card",
    "provenance_for": "card",
    "Provenance": "card",
    "verify_in_fresh_process": "verify",
    "lay_out_hub_cache": "verify",
    "VerificationError": "verify",
    "VerifyReport": "verify",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = sorted(_EXPORTS)
