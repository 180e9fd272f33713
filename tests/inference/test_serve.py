"""`parcae serve` on 127.0.0.1 in a subprocess, called over real HTTP: answers equal the engine's for each request
alone, continuous batching (a short request finishes while a long one streams), limits and strict validation
(each bad request a 400 while the others continue), logprobs, a disconnected client's row cancelled, SIGTERM."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE_TOKENIZER
from parcae.data import load_tokenizer
from parcae.data.tokenizer import TextStream, encode_prompt, eos_id
from parcae.inference import Engine, Sampling
from test_generate_cli import make_run

BLOCK = 160        # the test model's context: room for a long request beside short ones
LOOP_CAP = 6       # --max_request_loops of the test server (mu_rec is 3)
LONG = {"prompt": "KING:", "max_tokens": 60, "temperature": 0, "loops": LOOP_CAP}

pytestmark = pytest.mark.usefixtures("one_thread")


def post(port, payload, timeout=60):
    """(status, parsed JSON body) of a POST to /v1/completions; ``payload`` a dict, or bytes sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    status, text = r.status, r.read().decode()
    conn.close()
    return status, json.loads(text)


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def open_stream(port, payload):
    """A streaming request left open: (connection, response); read events with next_event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**payload, "stream": True}).encode(),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    return conn, r


def next_event(r):
    """The next server-sent event's data (a dict, or "[DONE]")."""
    while True:
        line = r.fp.readline().decode()
        if not line:
            raise EOFError("stream ended without [DONE]")
        if line.startswith("data: "):
            data = line[6:].strip()
            return data if data == "[DONE]" else json.loads(data)


def read_stream(r):
    events = []
    while (e := next_event(r)) != "[DONE]":
        events.append(e)
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root, ckpt, *flags, command=("parcae.inference.serve",)):
    """The server in a subprocess (``command``: the module run with -m and its first arguments; by default
    `parcae serve`'s own module, which spares the CLI's imports)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    log = root / f"server-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", *command, "--ckpt_path", str(ckpt), "--port", str(port), *flags],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group: the test can check nothing is left
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log.read_text())
        try:
            if get(port, "/health")["status"] == "ok":
                return proc, port
        except (ConnectionError, OSError):
            time.sleep(0.3)
    stop_group(proc)
    raise RuntimeError("server did not come up in 120 s:\n" + log.read_text())


def stop_group(proc):
    """SIGTERM the server's process group, SIGKILL what is left: nothing outlives the test."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt, model = make_run(root, "parcae", block_size=BLOCK)
    return root, ckpt, model


@pytest.fixture(scope="module")
def server(run):
    root, ckpt, model = run
    proc, port = start_server(root, ckpt, "--max_batch_size", "4", "--max_request_loops", str(LOOP_CAP),
                              "--prefill_chunk", "16")
    yield port, model
    stop_group(proc)


TOK = load_tokenizer(str(SHAKESPEARE_TOKENIZER))
EOS = eos_id(TOK)


def ids_of(prompt):
    return encode_prompt(TOK, prompt)


def alone(model, payload):
    """(text, token ids, loops per token) the engine gives this request by itself."""
    key = json.dumps(payload, sort_keys=True)
    if key not in ALONE:
        ALONE[key] = _alone(model, payload)
    return ALONE[key]


ALONE = {}  # the engine's answers, computed once per payload (the model is the module's one)


def _alone(model, payload):
    depth = {k: payload[k] for k in ("loops", "exit", "max_loops", "exit_every", "kv_policy", "continuous")
             if k in payload}
    sampling = Sampling(payload.get("temperature", 1.0), payload.get("top_k"), payload.get("top_p"),
                        seed=payload.get("seed", 0))
    out = Engine(model, **depth).generate([ids_of(payload["prompt"])], payload.get("max_tokens", 16), sampling,
                                          stop_ids=[EOS])[0]
    return TOK.decode(out.tokens, skip_special_tokens=True), out.tokens, out.depths


def test_answers_equal_each_request_alone_streamed_or_not(server):
    port, model = server
    payloads = [{"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0},
                {"prompt": "KING:", "max_tokens": 9, "temperature": 0, "loops": 2},
                {"prompt": "O", "max_tokens": 5, "temperature": 0, "exit": "latent-diff:0.05", "max_loops": 6,
                 "kv_policy": "latest"},
                {"prompt": "Good morrow", "max_tokens": 7, "temperature": 0, "continuous": True},
                {"prompt": "Thou", "max_tokens": 6, "temperature": 0, "exit": "kl:0.01", "max_loops": 6,
                 "exit_every": 2},
                {"prompt": "To be", "max_tokens": 8, "temperature": 0.9, "top_k": 50, "seed": 2**45},
                {"prompt": "HAMLET:", "max_tokens": 5, "temperature": 1.0, "seed": 7}]
    with ThreadPoolExecutor(len(payloads)) as pool:   # concurrently: they share the running batch
        answers = list(pool.map(lambda p: post(port, p), payloads))
    for p, (status, body) in zip(payloads, answers):
        assert status == 200, body
        text, tokens, depths = alone(model, p)
        choice = body["choices"][0]
        assert choice["text"] == text and choice["loops"] == depths
        assert body["usage"] == {"prompt_tokens": len(ids_of(p["prompt"])), "completion_tokens": len(tokens),
                                 "total_tokens": len(ids_of(p["prompt"])) + len(tokens)}
        assert choice["finish_reason"] == ("stop" if tokens[-1] == EOS else "length")
    # streamed: one event per token, the same text; the last event carries finish_reason and usage
    conn, r = open_stream(port, payloads[1])
    events = read_stream(r)
    conn.close()
    assert "".join(e["choices"][0]["text"] for e in events) == answers[1][1]["choices"][0]["text"]
    assert [d for e in events for d in e["choices"][0]["loops"]] == answers[1][1]["choices"][0]["loops"]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 9
    # a stop string split over two tokens: the text ends before it (its first part is never sent, streamed or
    # not), finish_reason is "stop", and the row leaves the batch
    status, with_lp = post(port, {**payloads[0], "logprobs": 1})
    full, pieces = with_lp["choices"][0]["text"], with_lp["choices"][0]["logprobs"]["tokens"]
    i = next(i for i in range(1, len(pieces)) if pieces[i - 1].strip() and pieces[i].strip()
             and "\ufffd" not in pieces[i - 1] + pieces[i])
    stop = pieces[i - 1][-1] + pieces[i][0]
    expected = full[: full.index(stop)]
    before = get(port, "/scheduler")
    status, body = post(port, {**payloads[0], "stop": [stop, "never appears"]})
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == expected and body["usage"]["completion_tokens"] <= i + 1
    conn, r = open_stream(port, {**payloads[0], "stop": stop})
    events = read_stream(r)
    conn.close()
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    after = wait_for(port, lambda s: s["active"] == 0)
    assert after["cancelled"] + after["finished"] == before["cancelled"] + before["finished"] + 2


def test_each_request_is_checked_alone(server):
    """A long prompt asking few tokens beside a short prompt asking many: each fits the context alone (checked
    against the largest max_tokens of a batch they would not)."""
    port, model = server
    text = "ROMEO: " * 200
    n = next(k for k in range(1, len(text)) if len(ids_of(text[:k])) >= BLOCK // 2 + 10)
    big = {"prompt": text[:n], "max_tokens": 4, "temperature": 0}
    small = {"prompt": "O", "max_tokens": BLOCK // 2, "temperature": 0}
    assert len(ids_of(big["prompt"])) + small["max_tokens"] > BLOCK
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: post(port, p), [big, small]))
    for p, (status, body) in zip([big, small], answers):
        assert status == 200, body
        assert body["choices"][0]["text"] == alone(model, p)[0]


def test_a_short_request_finishes_while_a_long_one_streams(server):
    port, model = server
    conn, r = open_stream(port, LONG)
    first = next_event(r)
    assert first["choices"][0]["finish_reason"] is None
    status, short = post(port, {"prompt": "O", "max_tokens": 2, "temperature": 0})
    assert status == 200 and short["usage"]["completion_tokens"] == 2
    # the long request is still running when the short one has its answer, and ends with its own full answer
    assert get(port, "/scheduler")["active"] == 1
    rest = read_stream(r)
    conn.close()
    assert rest[-1]["choices"][0]["finish_reason"] is not None
    assert first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest) == alone(model, LONG)[0]


BAD_REQUESTS = [  # (body, words the 400's message must contain)
    ({"max_tokens": 3}, "prompt: Field required"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "max_tokens": "4"}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "max_tokens": 4.0}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "temperature": True}, "temperature: Input should be a valid number"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature: Input should be a valid number"),
    ({"prompt": "x", "stream": 1}, "stream: Input should be a valid boolean"),
    ({"prompt": "x", "seed": 2**64}, "seed must be an integer in [0, 2**64)"),
    ({"prompt": "x", "seed": -1}, "seed must be an integer in [0, 2**64)"),
    ({"prompt": "x", "loops": 10000}, f"at most {LOOP_CAP} loops per token"),
    ({"prompt": "x", "loops": LOOP_CAP + 1}, f"at most {LOOP_CAP} loops per token"),
    ({"prompt": "x", "exit": "kl", "max_loops": 1500}, f"at most {LOOP_CAP} loops per token"),
    ({"prompt": "x", "loops": 0}, "loops must be an integer >= 1"),
    ({"prompt": "x", "exit": "sometimes"}, "unknown exit rule"),
    ({"prompt": "x", "exit": "kl", "exit_every": 0}, "exit_every"),
    ({"prompt": "x", "kv_policy": "ring:0"}, "ring:K needs an integer K >= 1"),
    ({"prompt": "x", "max_tokens": -2}, "max_tokens must be >= 0"),
    ({"prompt": "x", "max_tokens": BLOCK}, f"exceeds the model's context of {BLOCK} tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature must be >= 0"),
    ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_k": 0}, "top_k must be >= 1"),
    ({"prompt": "x", "logprobs": 99}, "logprobs must be in [0, 20]"),
    ({"prompt": "x", "n": 2}, "n must be 1"),
    ({"prompt": ["a", "b"]}, "one prompt per request"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty: Extra inputs are not permitted"),
    (b"{not json", "the body is not valid JSON"),
]


def test_each_bad_request_is_a_400_while_others_continue(server):
    port, model = server
    conn, r = open_stream(port, LONG)
    first = next_event(r)
    for body, words in BAD_REQUESTS:
        status, answer = post(port, body)
        assert status == 400 and words in answer["error"]["message"], (body, answer)
    rest = read_stream(r)
    conn.close()
    assert first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest) == alone(model, LONG)[0]
    assert get(port, "/scheduler")["failed"] == 0


def test_max_tokens_zero_seeds_and_unseeded_sampling(server):
    port, model = server
    status, body = post(port, {"prompt": "ROMEO:", "max_tokens": 0})
    n = len(ids_of("ROMEO:"))
    assert status == 200 and body["choices"][0]["text"] == "" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    conn, r = open_stream(port, {"prompt": "ROMEO:", "max_tokens": 0})
    events = read_stream(r)
    conn.close()
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 0
    # seeds beyond 2**44 (where seed * 1_000_003 left torch's range) sample like any other
    for seed in (2**45, 2**64 - 1):
        p = {"prompt": "To be", "max_tokens": 6, "temperature": 1.0, "seed": seed}
        status, body = post(port, p)
        assert status == 200 and body["choices"][0]["text"] == alone(model, p)[0] and body["seed"] == seed
    # unseeded sampling draws a seed per request (reported, so the answer can be reproduced)
    p = {"prompt": "To be", "max_tokens": 6, "temperature": 1.0}
    answers = [post(port, p)[1] for _ in range(2)]
    assert answers[0]["seed"] != answers[1]["seed"]
    for a in answers:
        assert a["choices"][0]["text"] == alone(model, {**p, "seed": a["seed"]})[0]


def test_logprobs_are_the_models(server):
    port, model = server
    status, body = post(port, {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0, "logprobs": 3})
    assert status == 200
    lp = body["choices"][0]["logprobs"]
    ids = ids_of("ROMEO:")
    with torch.no_grad():
        for i, token in enumerate(lp["token_ids"]):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1, : model.config.vocab_size], -1)
            assert token == int(logp.argmax()) and lp["token_logprobs"][i] == pytest.approx(float(logp[token]),
                                                                                            abs=1e-4)
            top = torch.topk(logp, 3)
            assert sorted(lp["top_logprobs"][i].values(), reverse=True) == pytest.approx(top.values.tolist(),
                                                                                         abs=1e-4)
            assert lp["tokens"][i] == TOK.decode([token], skip_special_tokens=False)
            ids.append(token)
    text = body["choices"][0]["text"]
    stream, offsets = TextStream(TOK), []
    for token in lp["token_ids"]:
        offsets.append(len(stream.text))
        stream.push(token)
    assert lp["text_offset"] == offsets and stream.text == text


def wait_for(port, condition, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = get(port, "/scheduler")
        if condition(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"scheduler state after {seconds} s: {state}")


def test_a_client_that_disconnects_has_its_generation_cancelled(server):
    port, model = server
    before = get(port, "/scheduler")
    conn, r = open_stream(port, LONG)          # streaming: the client reads one token, then hangs up
    next_event(r)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    state = wait_for(port, lambda s: s["cancelled"] == before["cancelled"] + 1 and s["active"] == 0)
    assert state["finished"] == before["finished"]   # it was stopped, not run to its end
    # not streaming: the client gives up while its answer is being generated
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(LONG).encode(), {"Content-Type": "application/json"})
    wait_for(port, lambda s: s["active"] == 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    state = wait_for(port, lambda s: s["cancelled"] == before["cancelled"] + 2 and s["active"] == 0)
    assert state["finished"] == before["finished"]
    # the next request is served as usual
    status, body = post(port, {"prompt": "O", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == alone(model, {"prompt": "O", "max_tokens": 3,
                                                                         "temperature": 0})[0]


def test_sigterm_stops_the_server_and_frees_its_port(run):
    """SIGTERM to the server's pid (what a process manager sends) while a request streams: the process group
    is empty and the port free within seconds."""
    root, ckpt, _ = run
    proc, port = start_server(root, ckpt, command=("parcae", "serve"))   # the command a user runs
    try:
        conn, r = open_stream(port, LONG)
        next_event(r)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
        conn.close()
        assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 0)
        with pytest.raises(ProcessLookupError):   # no process of its group is left
            os.killpg(proc.pid, 0)
        with socket.socket() as s:   # the port can be taken again (by a server, which sets SO_REUSEADDR)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        stop_group(proc)
