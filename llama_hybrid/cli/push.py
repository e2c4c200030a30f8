"""`llama-hybrid push`: the command-line face of hub_upload (the main CLI calls `add_subcommand`).

hub_upload (which loads torch and transformers) is imported when the command runs, after the up-front checks of the
model folder, the repo id and the staging folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_subcommand(subparsers: argparse._SubParsersAction[Any]) -> None:
    push = subparsers.add_parser(
        "push",
        help="build, verify and upload a LlamaHybrid model folder to the Hugging Face Hub",
        description=(
            "Build a Hub-ready folder from MODEL_DIR (sharded safetensors, config with auto_map, the modeling code "
            "for trust_remote_code, tokenizer, generation config, model card), verify it loads and gives the same "
            "logits in a fresh Python process without llama-hybrid, then upload it with huggingface_hub. "
            "With --dry-run nothing is sent and no token or network is needed."
        ),
    )
    push.add_argument("model_dir", metavar="MODEL_DIR", help="a LlamaHybrid folder (e.g. from `llama-hybrid convert`)")
    push.add_argument("--repo-id", required=True, metavar="ID", help="Hub repository, e.g. your-name/my-model")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default="main", metavar="R", help="branch to commit to (created if missing)")
    push.add_argument("--dry-run", action="store_true", help="build and verify, list what would be sent, send nothing")
    push.add_argument(
        "--staging-dir", default=None, metavar="DIR", help="build the folder here and keep it (default: a temp dir)"
    )
    push.add_argument("--overwrite", action="store_true", help="replace a non-empty --staging-dir")
    push.add_argument(
        "--max-shard-size",
        default=None,
        metavar="S",
        help="largest safetensors shard, e.g. 500MB, 2GB or a byte count (default: hub_upload's DEFAULT_MAX_SHARD_SIZE)",
    )
    push.add_argument(
        "--token-env",
        default=None,
        metavar="NAME",
        help="environment variable holding the Hub token (default: HF_TOKEN or the `hf auth login` token)",
    )
    push.add_argument("--base-model", default=None, metavar="ID", help="Hub id of the model these weights come from")
    push.add_argument("--license", default=None, metavar="ID", help="license of the weights, e.g. apache-2.0")
    push.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    """Run `push` (what the user can fix raises; `main` turns it into one `error:` line and exit code 2)."""
    from huggingface_hub.utils import validate_repo_id

    from llama_hybrid.model_source import LLAMA_HYBRID, check_output_dir, locate_model

    if not Path(args.model_dir).expanduser().is_dir():
        state = "is a file" if Path(args.model_dir).expanduser().exists() else "does not exist"
        raise ValueError(
            f"{args.model_dir} {state}; push uploads a local LlamaHybrid folder (from `llama-hybrid convert`)"
        )
    model_dir = locate_model(args.model_dir, accept=(LLAMA_HYBRID,))
    validate_repo_id(args.repo_id)
    if args.staging_dir:
        check_output_dir(args.staging_dir, args.overwrite)
    from llama_hybrid.hub_upload.publish import push

    shard_size = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
    push(
        model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        staging_dir=args.staging_dir,
        overwrite=args.overwrite,
        **shard_size,
        token_env=args.token_env,
        base_model=args.base_model,
        license=args.license,
    )
    return 0
