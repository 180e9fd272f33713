"""`parcae serve` on localhost in a subprocess, called over real HTTP: completions, streaming, batching across
concurrent requests, and a bad request that gets a 4xx while the server keeps serving."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib.error
import urllib.request
import pytest
import torch

from parcae.data import load_tokenizer
from parcae.inference import Engine
from conftest import SHAKESPEARE_TOKENIZER
from test_generate_cli import make_run


def post(url, payload, timeout=60):
    """(status, body text) of a JSON POST, with the standard library's HTTP client."""
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt, model = make_run(root, "parcae")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "parcae.inference.serve",  # = `parcae serve`, without Lightning imports
                             "--ckpt_path", str(ckpt), "--port", str(port),
                             "--max_batch_size", "4", "--batch_timeout", "0.3"],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # LitServe starts worker processes: stop the whole group
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + (root / "server.log").read_text())
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    else:
        stop_group(proc)
        raise RuntimeError("server did not come up in 120 s")
    yield url, model
    stop_group(proc)


def stop_group(proc):
    """SIGTERM the server and its workers, SIGKILL what is left after 20 s: nothing outlives the test."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; workers of the group may remain
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def expected_greedy(model, prompt, n):
    tok = load_tokenizer(str(SHAKESPEARE_TOKENIZER))
    ids = [tok.token_to_id("<|bos|>"), *tok.encode(prompt, add_special_tokens=False).ids]
    out = Engine(model).generate([ids], n, stop_ids=[tok.token_to_id("<|eos|>")])[0]
    return tok.decode(out.tokens, skip_special_tokens=True), len(out.tokens)


def test_completion_streaming_batching_and_bad_request(server):
    url, model = server
    # plain completion, greedy: the engine's own answer
    status, text_body = post(url + "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0})
    assert status == 200, text_body
    body = json.loads(text_body)
    text, n = expected_greedy(model, "ROMEO:", 6)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == text
    assert body["choices"][0]["loops"] == [model.config.mean_recurrence] * n
    assert body["usage"]["completion_tokens"] == n

    # a bad request: clear 4xx with the reason
    status, reason = post(url + "/v1/completions", {"prompt": "x", "exit": "sometimes"})
    assert 400 <= status < 500 and "unknown exit rule" in reason
    assert post(url + "/v1/completions", {"prompt": "x", "max_tokens": -2})[0] == 400

    # streaming, with depth options: server-sent events, one token per chunk, then [DONE]
    chunks = []
    req = urllib.request.Request(url + "/v1/completions", json.dumps(
        {"prompt": "KING:", "max_tokens": 5, "temperature": 0, "stream": True, "exit": "latent-diff:0.5",
         "max_loops": 6, "kv_policy": "latest"}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as s:
        assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
        for raw in s:  # read as the events arrive
            line = raw.decode().strip()
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert len(events) >= 1 and all(1 <= d <= 6 for e in events for d in e["choices"][0]["loops"])
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    # concurrent requests are batched and each still gets its own (alone) answer
    prompts = ["To be", "KING:", "O", "Good morrow"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: json.loads(post(url + "/v1/completions",
                                                          {"prompt": p, "max_tokens": 4, "temperature": 0}, 120)[1]),
                                prompts))
    assert [a["choices"][0]["text"] for a in answers] == [expected_greedy(model, p, 4)[0] for p in prompts]
