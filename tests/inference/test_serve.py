"""`parcae serve`, called over real HTTP: answers equal the engine's for each request alone, continuous batching (a
short request finishes while a long one streams), limits and strict validation (each bad request a 400 while the
others continue), logprobs, a disconnected client's row cancelled, and the server's rule -- nothing one request
sends can fail, stall or starve another: huge bodies, prompts and stop lists are refused before any work while a
neighbour streams on, numbers that cannot sample are refused, a full queue answers 429, a stop ends every open
request cleanly.

The app runs in this process (uvicorn in a thread on a free port); only the signal tests start a real server
process (marked ``subprocess``)."""

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from conftest import SHAKESPEARE_TOKENIZER
from parcae.command_line import call_verb
from parcae.data import load_tokenizer
from parcae.data.tokenizer import TextStream, encode_prompt, eos_id, max_token_chars, special_ids
from parcae.inference import Engine, Sampling
from parcae.inference.cli import generate
from parcae.inference.serve import MAX_STOP_CHARS, MAX_STOPS, StopText, build_app
from parcae.runs import load_checkpoint
from test_generate_cli import make_run

BLOCK = 160        # the test model's context: room for a long request beside short ones
LOOP_CAP = 6       # --max_request_loops of the test server (mu_rec is 3)
LONG = {"prompt": "KING:", "max_tokens": 60, "temperature": 0, "loops": LOOP_CAP}

pytestmark = pytest.mark.usefixtures("one_thread")


def post(port, payload, timeout=60, headers=None):
    """(status, parsed JSON body) of a POST to /v1/completions; ``payload`` a dict, or bytes sent as they are."""
    status, body, _ = post_full(port, payload, timeout, headers)
    return status, body


def post_full(port, payload, timeout=60, headers=None):
    """(status, parsed JSON body, response headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    status, text, head = r.status, r.read().decode(), dict(r.headers)
    conn.close()
    return status, json.loads(text), head


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


@contextmanager
def in_process(model, tok, **options):
    """``build_app(model, tok, **options)`` served by uvicorn in a thread on a free port: (port, app)."""
    app = build_app(model, tok, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1], app
    finally:
        server.should_exit = True   # uvicorn's own way to stop a server it runs
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt, model = make_run(root, "parcae", block_size=BLOCK)
    loaded = load_checkpoint(str(ckpt), "cpu", None)   # what `parcae serve` loads
    return root, ckpt, loaded.model, loaded.tokenizer


SERVER = {"max_batch_size": 4, "max_request_loops": LOOP_CAP, "prefill_chunk": 16}


@pytest.fixture(scope="module")
def server(run):
    _, _, model, tok = run
    with in_process(model, tok, **SERVER) as (port, _):
        yield port, model


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
    # the text by the server's rule (TextStream): a character whose bytes are not all generated yet is not text,
    # where TOK.decode would end on U+FFFD (a sampled answer may stop inside a multi-byte character)
    stream = TextStream(TOK)
    for token in out.tokens:
        stream.push(token)
    return stream.text, out.tokens, out.depths


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


def test_stop_strings_cut_the_answer_where_the_first_one_completes_whatever_the_pieces():
    """The incremental matcher against the plain rule on random texts, stop lists and ways to split the text into
    pieces: the answer is the text before the first stop string to complete (the longest, if several end at the
    same character), and nothing shown is ever taken back (the pieces add up to it)."""
    def rule(text, stops):
        for end in range(1, len(text) + 1):
            done = [s for s in stops if text[:end].endswith(s)]
            if done:
                return text[: end - max(map(len, done))], True
        return text, False

    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        matcher, shown, at = StopText(stops), [], 0
        while True:
            n = rng.randint(0, 4)
            piece, at = text[at:at + n], at + n
            shown.append(matcher.add(piece, at >= len(text)))
            if at >= len(text):
                break
        assert ("".join(shown), matcher.stopped) == rule(text, stops), (stops, text, shown)


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


LONGEST_PROMPT = max_token_chars(TOK) * (BLOCK - 1)   # characters: any longer prompt has more tokens than BLOCK

BAD_REQUESTS = [  # (body, words the 400's message must contain)
    ({"max_tokens": 3}, "prompt: Field required"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "max_tokens": "4"}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "max_tokens": 4.0}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "temperature": True}, "temperature: Input should be a valid number"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature: Input should be a valid number"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature: Input should be a finite number"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature: Input should be a finite number"),
    (b'{"prompt": "x", "temperature": 1e999}', "temperature: Input should be a finite number"),
    (b'{"prompt": "x", "top_p": NaN}', "top_p: Input should be a finite number"),
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
    # sizes, refused before the prompt is tokenized
    ({"prompt": "x", "stop": ["."] * (MAX_STOPS + 1)}, f"at most {MAX_STOPS} stop strings"),
    ({"prompt": "x", "stop": ["a" * (MAX_STOP_CHARS // 2 + 1)] * 2}, f"of {MAX_STOP_CHARS} characters together"),
    ({"prompt": "x" * (LONGEST_PROMPT + 1)}, f"the prompt has {LONGEST_PROMPT + 1:,} characters"),
]


def test_each_bad_request_is_a_400_while_others_continue(server):
    port, model = server
    conn, r = open_stream(port, LONG)
    first = next_event(r)
    for body, words in BAD_REQUESTS:
        status, answer = post(port, body)
        assert status == 400 and words in answer["error"]["message"], (body, answer)
        assert answer["error"]["type"] == "invalid_request_error" and "\n" not in answer["error"]["message"]
    rest = read_stream(r)
    conn.close()
    assert first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest) == alone(model, LONG)[0]
    assert get(port, "/scheduler")["failed"] == 0
    # the longest prompt the size check lets through is tokenized and checked exactly
    status, answer = post(port, {"prompt": "x" * LONGEST_PROMPT})
    assert status == 400 and "exceeds the model's context" in answer["error"]["message"]


def test_a_temperature_that_cannot_sample_fails_no_neighbour(server):
    """NaN and Infinity (raw in the JSON) are refused; a neighbouring greedy request gets its own answer."""
    port, model = server
    greedy = {"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}
    bodies = [b'{"prompt": "KING:", "max_tokens": 12, "temperature": NaN}',
              b'{"prompt": "KING:", "max_tokens": 12, "temperature": Infinity}',
              b'{"prompt": "KING:", "max_tokens": 12, "temperature": 0.5, "top_p": NaN}']
    with ThreadPoolExecutor(1 + len(bodies)) as pool:
        answers = list(pool.map(lambda p: post(port, p), [greedy, *bodies]))
    assert answers[0][0] == 200 and answers[0][1]["choices"][0]["text"] == alone(model, greedy)[0]
    assert [status for status, _ in answers[1:]] == [400] * len(bodies)


def test_a_tiny_temperature_is_harmless_to_its_neighbour(server):
    """1e-300 passes validation and samples as the limit of a falling temperature does: greedily. It joins the
    lane of a greedy stream already running; it used to fail both with 500 'probability tensor contains either
    inf, nan'."""
    port, model = server
    greedy = {"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}
    conn, r = open_stream(port, greedy)
    first = next_event(r)
    status, body = post(port, {"prompt": "KING:", "max_tokens": 12, "temperature": 1e-300, "seed": 3})
    rest = read_stream(r)
    conn.close()
    assert first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest) == alone(model, greedy)[0]
    assert status == 200, body
    assert body["choices"][0]["text"] == alone(model, {"prompt": "KING:", "max_tokens": 12, "temperature": 0})[0]


def _health_latencies(port, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        t = time.monotonic()
        assert get(port, "/health")["status"] == "ok"
        out.append(time.monotonic() - t)
        time.sleep(0.05)


def test_huge_requests_are_refused_before_any_work_while_a_neighbour_streams(server):
    """A 20 MB and a 5 MB body are refused 413 unread (the 20 MB one before its body is even sent), a chunked
    upload once it passes the limit, a prompt too long for the context by its length alone (not tokenized),
    10,000 stop strings of 200 characters at once; meanwhile a neighbour's stream goes on without a pause and
    /health answers at once."""
    port, model = server
    conn, r = open_stream(port, LONG)
    events, gaps = [next_event(r)], []

    def read_rest():
        last = time.monotonic()
        while (e := next_event(r)) != "[DONE]":
            events.append(e)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    latencies, done = [], threading.Event()
    threads = [threading.Thread(target=read_rest), threading.Thread(target=_health_latencies,
                                                                    args=(port, done, latencies))]
    for t in threads:
        t.start()
    try:
        # declared 20 MB: answered before a byte of the body is sent
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 20000000\r\n\r\n")
        response = http.client.HTTPResponse(raw)
        response.begin()
        assert response.status == 413 and b"20,000,000 bytes" in response.read()
        raw.close()
        for n in (5_000_000, 1_100_000):
            status, answer = post(port, json.dumps({"prompt": "ROMEO " * (n // 6)}).encode())
            assert status == 413 and "(--max_request_bytes)" in answer["error"]["message"]
        # chunked (no length given): refused once the bytes read pass the limit
        chunked = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        chunked.request("POST", "/v1/completions", (b'{"prompt": "' + b"x" * 65536 for _ in range(320)),
                        {"Content-Type": "application/json"}, encode_chunked=True)
        response = chunked.getresponse()
        assert response.status == 413 and b"over 1,048,576 bytes" in response.read()
        chunked.close()
        # under the byte limit but longer than any prompt the context holds: refused by its length, untokenized
        status, answer = post(port, {"prompt": "ROMEO " * 150_000})
        assert status == 400 and "the prompt has 900,000 characters" in answer["error"]["message"]
        stops = [f"{i:05d}" * 40 for i in range(10_000)]   # 10,000 distinct stop strings of 200 characters
        status, answer = post(port, {"prompt": "x", "stop": stops})
        assert status == 413
    finally:
        threads[0].join(60)
        done.set()
        threads[1].join(10)
        conn.close()
    assert "".join(e["choices"][0]["text"] for e in events) == alone(model, LONG)[0]
    assert max(gaps) < 2.0 and max(latencies) < 2.0, (max(gaps), max(latencies))  # it stalled 8.8 s (5 MB)


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
    # logprobs 0 (OpenAI): the chosen token's log-probability, no alternatives; streamed the same
    status, zero = post(port, {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0, "logprobs": 0})
    lp0 = zero["choices"][0]["logprobs"]
    assert status == 200 and lp0 is not None and lp0["top_logprobs"] == [{}] * 4
    assert lp0["token_logprobs"] == pytest.approx(lp["token_logprobs"]) and lp0["token_ids"] == lp["token_ids"]
    conn, r = open_stream(port, {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0, "logprobs": 0})
    events = read_stream(r)
    conn.close()
    assert [e["choices"][0]["logprobs"]["token_logprobs"][0] for e in events] == pytest.approx(lp["token_logprobs"])
    # not asked for: none
    status, none = post(port, {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0})
    assert none["choices"][0]["logprobs"] is None


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


def wait_for(port, condition, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = get(port, "/scheduler")
        if condition(state):
            return state
        time.sleep(0.05)
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
    # not streaming: the client gives up while its answer is being generated (the longest answer the context holds:
    # the server looks at the connection every 0.25 s, and 60 tokens of this tiny model can take less than that)
    longest = {**LONG, "max_tokens": BLOCK - len(ids_of(LONG["prompt"]))}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(longest).encode(), {"Content-Type": "application/json"})
    wait_for(port, lambda s: s["active"] == 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    state = wait_for(port, lambda s: s["cancelled"] == before["cancelled"] + 2 and s["active"] == 0)
    assert state["finished"] == before["finished"]
    # the next request is served as usual
    status, body = post(port, {"prompt": "O", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == alone(model, {"prompt": "O", "max_tokens": 3,
                                                                         "temperature": 0})[0]


def test_a_full_queue_answers_429_at_once(run):
    """One row at a time and two places in the queue: of 64 requests sent together, those past the queue are
    refused at once with 429, a one-line OpenAI-style error and Retry-After; the others get their own answers."""
    _, _, model, tok = run
    payload = {"prompt": "O", "max_tokens": 8, "temperature": 0}
    with in_process(model, tok, max_batch_size=1, max_queue=2) as (port, _):
        def timed(_):
            t = time.monotonic()
            return (*post_full(port, payload), time.monotonic() - t)

        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(timed, range(64)))
    served = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 429]
    assert len(served) + len(refused) == 64 and refused and len(served) >= 2
    for status, body, headers, _ in refused:
        assert headers["retry-after"] == "1" and body["error"]["type"] == "rate_limit_error"
        assert body["error"]["code"] == 429 and "max_queue 2" in body["error"]["message"]
    for status, body, headers, _ in served:
        assert body["choices"][0]["text"] == alone(model, payload)[0]
    # refused without waiting for anyone's answer
    assert min(t for *_, t in refused) < max(t for *_, t in served)


def test_a_stopping_server_ends_every_open_request_cleanly(run):
    """What SIGTERM / Ctrl-C does to the requests (the app's stop, here called directly): a stream ends with an
    error event and [DONE], a non-streaming request gets a JSON 503, a new request a 503."""
    _, _, model, tok = run
    with in_process(model, tok, **SERVER) as (port, app):
        conn, r = open_stream(port, LONG)
        first = next_event(r)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, port, LONG)
            wait_for(port, lambda s: s["active"] == 2)
            app.state.stopping.begin()
            rest = read_stream(r)
            status, body = waiting.result(30)
        conn.close()
        assert first["choices"][0]["finish_reason"] is None
        assert rest[-1]["error"]["code"] == 503 and "shutting down" in rest[-1]["error"]["message"]
        assert all("choices" in e for e in rest[:-1])
        assert status == 503 and body["error"]["type"] == "server_error" and "shutting down" in \
            body["error"]["message"]
        status, body = post(port, {"prompt": "O", "max_tokens": 2})
        assert status == 503 and "shutting down" in body["error"]["message"]


def test_prompt_text_is_text_unless_special_tokens_is_asked_for(run, capsys):
    """`hi <|eos|> <|bos|>` typed by a user is those characters, in the server and in `parcae generate`; only
    --special_tokens makes the spellings control tokens."""
    _, ckpt, model, tok = run
    text = "hi <|eos|> <|bos|>"
    as_text, as_control = encode_prompt(TOK, text), encode_prompt(TOK, text, special_tokens=True)
    assert not set(special_ids(TOK).values()) & set(as_text[1:]) and len(as_control) < len(as_text)

    def continuation(ids):
        out = Engine(model).generate([ids], 5, Sampling(0), stop_ids=[EOS])[0]
        return TOK.decode(out.tokens, skip_special_tokens=True)

    for special_tokens, ids in ((False, as_text), (True, as_control)):
        with in_process(model, tok, special_tokens=special_tokens) as (port, _):
            status, body = post(port, {"prompt": text, "max_tokens": 5, "temperature": 0})
        assert status == 200 and body["usage"]["prompt_tokens"] == len(ids)
        assert body["choices"][0]["text"] == continuation(ids)
        capsys.readouterr()
        call_verb("generate", generate, ["--ckpt_path", str(ckpt), "--prompt", text, "--max_new_tokens", "5",
                                         "--temperature", "0", "--device", "cpu",
                                         *(["--special_tokens"] if special_tokens else [])])
        assert capsys.readouterr().out == text + continuation(ids) + "\n"


# -- a real server process: signals ------------------------------------------------------------------------------

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORDS = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}


def launch(root, ckpt, *flags):
    """`parcae serve`'s own module in a subprocess (the CLI's imports spared), in its own process group:
    (process, port, log)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    log = root / f"server-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "parcae.inference.serve", "--ckpt_path", str(ckpt), "--port",
                             str(port), *flags], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group: the test can check nothing is left
    return proc, port, log


def wait_ready(proc, port, log):
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log.read_text())
        try:
            if get(port, "/health")["status"] == "ok":
                return
        except (ConnectionError, OSError):
            time.sleep(0.2)
    raise RuntimeError("server did not come up in 120 s:\n" + log.read_text())


def stop_group(proc):
    """SIGKILL what is left of the server's process group: nothing outlives the test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def servers(run):
    """One server process per signal, started together (their start-up is most of these tests' time)."""
    root, ckpt, _, _ = run
    started = {signum: launch(root, ckpt) for signum in STATUS}
    try:
        for proc, port, log in started.values():
            wait_ready(proc, port, log)
        yield started
    finally:
        for proc, _, _ in started.values():
            stop_group(proc)


@pytest.mark.subprocess
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_every_request_and_stops_the_server(servers, signum):
    """SIGTERM (what a process manager sends) or Ctrl-C while one request streams and another waits for its
    answer: the stream ends with an error event and [DONE], the other gets a JSON 503, the server exits within
    seconds with parcae's one line and status 143 / 130, no traceback in its log, nothing of its process group left,
    and the port can be taken again."""
    proc, port, log = servers[signum]
    try:
        conn, r = open_stream(port, LONG)
        next_event(r)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, port, LONG)
            wait_for(port, lambda s: s["active"] == 2)
            sent = time.monotonic()
            os.kill(proc.pid, signum)
            rest = read_stream(r)
            status, body = waiting.result(30)
            answered = time.monotonic() - sent
            proc.wait(timeout=15)
            took = time.monotonic() - sent
        conn.close()
        assert rest[-1]["error"]["code"] == 503
        assert status == 503 and "shutting down" in body["error"]["message"]
        output = log.read_text()
        assert proc.returncode == STATUS[signum], output
        assert "Traceback" not in output and "CancelledError" not in output, output
        assert output.strip().splitlines()[-1] == f"parcae serve: {WORDS[signum]}", output
        # the requests end at once; the process then takes about 2 s, most of it the interpreter's own exit
        # after torch (1.7 s on the loaded 2-core test machine); it took 6.6 s before the requests were ended
        assert answered < 1.0 and took < 5.0, (answered, took)
        with pytest.raises(ProcessLookupError):   # no process of its group is left
            os.killpg(proc.pid, 0)
        with socket.socket() as s:   # the port can be taken again (by a server, which sets SO_REUSEADDR)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        stop_group(proc)
