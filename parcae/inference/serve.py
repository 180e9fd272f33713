"""``parcae serve``: an OpenAI-style text-completions server with continuous batching over the KV-cached engine.

    parcae serve --ckpt_path checkpoints/mini_demo/last.ckpt --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8, "stream": true}'

``POST /v1/completions`` takes OpenAI's text-completion fields (``prompt``, ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``stream``, ``seed``, ``logprobs``) plus the depth options of ``parcae generate`` as extra
fields (``loops``, ``exit``, ``min_loops``, ``max_loops``, ``exit_every``, ``kv_policy``, ``continuous``, ``top_k``). Each choice
also reports the loops used per token (``loops``, ``mean_loops``). ``GET /health`` answers once the model is loaded;
``GET /scheduler`` shows the scheduler's counters (rows running, queued, cancelled, ...).

One process: uvicorn serves a FastAPI app whose handlers validate each request alone (a 400 with the reason) and
hand it to :class:`parcae.inference.scheduler.Scheduler`, whose thread runs the model; tokens come back through
an asyncio queue per request. A client that disconnects has its row cancelled. docs/inference.md says why this is
not LitServe.

The server's rule: nothing one request sends can fail, stall or starve another. Its size is bounded before any
work that grows with it (the body's bytes while it is read, the prompt's characters before it is tokenized, the
stop strings' count and length); tokenizing runs off the event loop; the stop strings are matched incrementally
(:class:`StopText`: a token costs what its characters cost, not the length of the answer or of the stop strings);
numbers that cannot sample (NaN, infinite temperatures) are refused; a full queue answers 429 with Retry-After at
once instead of keeping the client waiting. SIGTERM or Ctrl-C ends every open request at once (a stream with a
final error event and ``data: [DONE]``, any other with a JSON 503) and stops the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import socket
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parcae.data.tokenizer import TextStream, encode_prompt, max_token_chars, stop_ids
from parcae.errors import UsageError

from .engine import Sampling
from .options import DepthOptions
from .scheduler import Job, Overloaded, Scheduler, TokenEvent

MAX_LOGPROBS = 20           # top-N log-probabilities a request may ask for
SEED_LIMIT = 2**64          # request seeds are unsigned 64-bit integers (torch's generator range)
MAX_STOPS = 16              # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 1024       # their characters together
MAX_REQUEST_BYTES = 2**20   # default --max_request_bytes: a body this long is far past any context's prompt
RETRY_AFTER_S = 1           # what a 429 tells the client to wait


class CompletionRequest(BaseModel):
    """The request body. Strict types: ``true`` or ``"4"`` is not a number; unknown fields are refused."""
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)  # NaN / Infinity are refused

    prompt: Union[str, list[str]]
    model: Optional[str] = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    seed: Optional[int] = None
    n: int = 1
    logprobs: Optional[int] = None
    user: Optional[str] = None
    # parcae extras: depth and sampling options of `parcae generate`
    top_k: Optional[int] = None
    loops: Optional[int] = None
    exit: Optional[str] = Field(default=None, description="RULE[:THRESHOLD], e.g. kl:1e-3")
    min_loops: int = 1
    max_loops: Optional[int] = None
    exit_every: int = 1
    kv_policy: Optional[str] = None  # the engine's default (latest with an exit rule)
    continuous: bool = False


def describe(err: ValidationError) -> str:
    """A body that does not parse, in one line: each field and what is wrong with it."""
    problems = []
    for e in err.errors():
        if e["type"] == "json_invalid":
            problems.append(f"the body is not valid JSON ({e['ctx']['error']})" if "ctx" in e else "the body is not JSON")
            continue
        where = ".".join(str(x) for x in e["loc"]) or "body"
        shown = "" if e["type"] == "missing" or isinstance(e.get("input"), dict) else f" (got {e['input']!r})"
        problems.append(f"{where}: {e['msg']}{shown}")
    return "; ".join(problems)


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400, the message is the reason)."""


class TooLarge(ValueError):
    """A request body over the server's limit (HTTP 413)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or TooLarge as soon as it is known to exceed ``limit`` bytes: from its Content-Length
    before reading anything, else once the bytes read pass the limit (a chunked upload), so a huge body is
    never held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is {int(declared):,} bytes; this server takes at most {limit:,} "
                       "(--max_request_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is over {limit:,} bytes, the most this server takes "
                           "(--max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class Limits:
    """What one request may ask for, checked against the model before it is queued."""

    def __init__(self, model, tok, max_request_loops: int, special_tokens: bool = False) -> None:
        self.model, self.tok, self.max_request_loops = model, tok, max_request_loops
        self.special_tokens = special_tokens
        per_token = max_token_chars(tok)   # a prompt longer than this many characters cannot fit the context
        self.max_prompt_chars = None if per_token is None else per_token * (model.config.block_size - 1)

    def sizes(self, r: CompletionRequest) -> tuple[str, list[str]]:
        """(the prompt, its stop strings), or BadRequest: what can be checked before any work that grows with the
        request's size (the prompt's characters bound its tokens from below, so an over-long prompt is refused
        without tokenizing it)."""
        prompt = r.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("send one prompt per request (batching happens across requests)")
            prompt = prompt[0]
        stops = [s for s in ([r.stop] if isinstance(r.stop, str) else (r.stop or [])) if s]
        if len(stops) > MAX_STOPS or sum(map(len, stops)) > MAX_STOP_CHARS:
            raise BadRequest(f"at most {MAX_STOPS} stop strings of {MAX_STOP_CHARS} characters together; got "
                             f"{len(stops):,} of {sum(map(len, stops)):,}")
        if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            raise BadRequest(f"the prompt has {len(prompt):,} characters, more tokens than the model's context of "
                             f"{self.model.config.block_size} tokens holds (shorten the prompt)")
        return prompt, stops

    def job(self, r: CompletionRequest) -> tuple[Job, list[str]]:
        """(the job, its stop strings) or BadRequest with the reason. Each request is checked alone; the prompt is
        tokenized last, once its size and every other field passed (call this off the event loop)."""
        prompt, stops = self.sizes(r)
        if r.n != 1:
            raise BadRequest(f"n must be 1, got {r.n}")
        if r.max_tokens < 0:
            raise BadRequest(f"max_tokens must be >= 0, got {r.max_tokens}")
        if r.seed is not None and not 0 <= r.seed < SEED_LIMIT:
            raise BadRequest(f"seed must be an integer in [0, 2**64), got {r.seed}")
        if r.logprobs is not None and not 0 <= r.logprobs <= MAX_LOGPROBS:
            raise BadRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {r.logprobs}")
        if not 0 < r.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {r.top_p}")
        sampling = Sampling(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p if r.top_p < 1 else None)
        depth = DepthOptions.of(r).resolved(self.model.config)   # the one check of the depth options
        cap = self.max_request_loops
        if max(depth.loops or 0, depth.max_loops) > cap:
            if r.loops is not None or r.max_loops is not None:
                raise BadRequest(f"at most {cap} loops per token on this server (--max_request_loops); "
                                 f"asked for {max(x for x in (r.loops, r.max_loops) if x is not None)}")
            # an exit rule's default ceiling, lowered to the cap
            depth = dataclasses.replace(depth, max_loops=cap).resolved(self.model.config)
        ids = encode_prompt(self.tok, prompt, special_tokens=self.special_tokens)
        context = self.model.config.block_size
        if len(ids) + r.max_tokens > context:
            raise BadRequest(f"the prompt is {len(ids)} tokens; with max_tokens={r.max_tokens} that exceeds the "
                             f"model's context of {context} tokens (shorten the prompt or ask for fewer tokens)")
        # an unseeded sampled request draws its own seed (reported in the answer), so repeats differ
        seed = r.seed if r.seed is not None else secrets.randbits(63)
        return Job(ids, r.max_tokens, depth, sampling, seed, r.logprobs), stops


class StopText:
    """The answer's text cut before the first stop string, as it grows: text that could be the start of a stop
    string is held back until it is known not to be, so a stop string split over tokens never leaks its first
    part into the answer. Each stop string is matched by its Knuth-Morris-Pratt automaton, one state per stop
    string carried from piece to piece, so a piece costs its characters times the number of stop strings: never
    the length of the answer so far or of the stop strings. The answer stops where the first stop string is
    complete (the longest one, if several end at the same character)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.stopped = stops, False
        self._fallback = [_kmp_fallback(s) for s in stops]
        self._matched = [0] * len(stops)   # per stop string: its longest prefix the text ends with
        self._held = ""                    # the text's end that may start a stop string, not yet answered

    def add(self, new: str, last: bool) -> str:
        """The next piece of the answer after the text ``new`` (``last``: the row has ended)."""
        if self.stopped:
            return ""
        text, before = self._held + new, len(self._held)
        end = len(text)
        for i, c in enumerate(new):
            done = 0
            for j, stop in enumerate(self.stops):
                k, fallback = self._matched[j], self._fallback[j]
                while k and stop[k] != c:
                    k = fallback[k - 1]
                k = k + 1 if stop[k] == c else 0
                self._matched[j] = k
                done = max(done, k) if k == len(stop) else done
            if done:
                end, self.stopped = before + i + 1 - done, True
                break
        if not self.stopped and not last:
            end -= max(self._matched, default=0)
        piece, self._held = text[:end], text[end:]
        return piece


def _kmp_fallback(s: str) -> list[int]:
    """Knuth-Morris-Pratt's failure function: ``f[i]`` is the longest proper prefix of ``s[:i + 1]`` that is also
    its suffix (where a match of ``s`` continues after a mismatch)."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


def _logprobs_entry(tok, event: TokenEvent, offset: int) -> dict:
    name = lambda i: tok.decode([i], skip_special_tokens=False)  # noqa: E731
    return {"tokens": [name(event.token)], "token_ids": [event.token], "token_logprobs": [event.logprob],
            "top_logprobs": [{name(i): lp for i, lp in event.top}], "text_offset": [offset]}


def _merge_logprobs(parts: list[dict]) -> Optional[dict]:
    if not parts:
        return None
    return {k: [v for p in parts for v in p[k]] for k in parts[0]}


class RowFailed(RuntimeError):
    """The scheduler ended this request's row with an error (HTTP 500; its neighbours go on)."""


class ServerStopping(RuntimeError):
    """The server is shutting down (HTTP 503)."""


_STOPPING = object()   # put in every open request's queue when the server stops


class Stopping:
    """The server's stop, as its requests see it: once :meth:`begin` is called (from the signal handler, or any
    thread), a request that arrives is refused and every open one ends at once, before uvicorn waits for them."""

    def __init__(self) -> None:
        self.begun = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._open: set[asyncio.Queue] = set()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the requests run on (the app's startup)."""
        self._loop = loop

    def begin(self) -> None:
        """Stop: safe from a signal handler and from any thread."""
        self.begun = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._end_all)

    def open(self, events: asyncio.Queue) -> None:
        """A request's event queue, to be ended if the server stops (then ServerStopping)."""
        self._open.add(events)
        if self.begun:
            raise ServerStopping("the server is shutting down")

    def close(self, events: asyncio.Queue) -> None:
        self._open.discard(events)

    def _end_all(self) -> None:
        for events in self._open:
            events.put_nowait(_STOPPING)


def _error_body(status: int, message: str, kind: str) -> dict:
    """An error in OpenAI's shape, its message one line."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, kind), status, headers=headers)


def _error_event(status: int, message: str) -> str:
    """A stream's last event before ``[DONE]`` when it ends in an error."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return f"data: {json.dumps(_error_body(status, message, kind))}\n\n"


SHUTTING_DOWN = "the server is shutting down; retry on another server or later"


def build_app(model, tok, *, max_batch_size: int = 8, max_request_loops: Optional[int] = None,
              prefill_chunk: int = 256, max_queue: Optional[int] = None, max_lanes: int = 4,
              max_request_bytes: int = MAX_REQUEST_BYTES, special_tokens: bool = False,
              depth_gather: Optional[int] = None, compile: bool = False):
    """The FastAPI app over one model (loaded by the caller) and one scheduler thread. ``app.state.stopping``
    ends every open request (:class:`Stopping`); :func:`serve` calls it on SIGTERM / SIGINT."""
    limits = Limits(model, tok, max_request_loops or 4 * model.config.mean_recurrence, special_tokens)
    scheduler = Scheduler(model, max_rows=max_batch_size, stop_ids=stop_ids(tok), prefill_chunk=prefill_chunk,
                          max_queue=max_queue, max_lanes=max_lanes, depth_gather=depth_gather, compile=compile)
    stopping = Stopping()

    @asynccontextmanager
    async def lifespan(app):
        stopping.attach(asyncio.get_running_loop())
        scheduler.start()
        yield
        stopping.begin()
        scheduler.close()

    app = FastAPI(title="parcae", lifespan=lifespan)
    app.state.scheduler, app.state.limits, app.state.stopping = scheduler, limits, stopping

    def refuse(message: str) -> JSONResponse:
        return error_response(400, message, "invalid_request_error")

    @app.get("/health")
    async def health():
        if not scheduler.running or stopping.begun:
            return JSONResponse({"status": "the scheduler is not running"}, 503)
        return {"status": "ok"}

    @app.get("/scheduler")
    async def scheduler_state():
        return scheduler.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.config.name, "object": "model", "owned_by": "parcae"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        if stopping.begun:
            return error_response(503, SHUTTING_DOWN, "server_error")
        try:  # the body is JSON whatever the Content-Type says (curl -d sends a form type)
            body = CompletionRequest.model_validate_json(await read_body(request, max_request_bytes))
        except TooLarge as err:
            return error_response(413, str(err), "invalid_request_error")
        except ValidationError as err:
            return refuse(describe(err))
        try:  # off the event loop: tokenizing takes time that grows with the prompt (bounded by Limits.sizes)
            job, stops = await asyncio.to_thread(limits.job, body)
        except ValueError as err:  # BadRequest and the engine's own checks (exit rule, KV policy, length ...)
            return refuse(str(err))
        ident, created = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": body.model or model.config.name}
        if body.temperature > 0:
            head["seed"] = job.seed
        prompt_tokens = len(job.prompt)

        def usage(n: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        if job.max_new_tokens == 0:  # nothing to generate: answered at once, like any finished request
            choice = {"text": "", "index": 0, "logprobs": _merge_logprobs([]), "finish_reason": "length",
                      "loops": [], "mean_loops": None}
            if body.stream:
                async def empty():
                    yield f"data: {json.dumps({**head, 'choices': [choice], 'usage': usage(0)})}\n\n"
                    yield "data: [DONE]\n\n"
                return StreamingResponse(empty(), media_type="text/event-stream")
            return {**head, "choices": [choice], "usage": usage(0)}

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            stopping.open(events)
            ticket = scheduler.submit(job, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except Overloaded as err:   # the queue is full: refused now, not kept waiting
            stopping.close(events)
            return error_response(429, str(err), "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)})
        except RuntimeError:        # ServerStopping, or the scheduler already closed
            stopping.close(events)
            return error_response(503, SHUTTING_DOWN, "server_error")
        stream = TextStream(tok)
        text = StopText(stops)

        async def pieces():
            """(text piece, event, text offset, finish_reason, tokens so far) per token until the row ends."""
            n = 0
            while True:
                ev = await events.get()
                if ev is _STOPPING:
                    raise ServerStopping(SHUTTING_DOWN)
                if ev.finish == "error":
                    raise RowFailed(ev.error)
                offset = len(stream.text)  # where this token's text starts (logprobs' text_offset)
                new = ""
                if ev.token is not None:
                    n += 1
                    new = stream.push(ev.token)
                piece = text.add(new, ev.finish is not None)
                finish = "stop" if text.stopped else ev.finish
                if text.stopped and ev.finish is None:
                    scheduler.cancel(ticket)   # a stop string: the row leaves at the next step
                yield piece, ev, offset, finish, n
                if finish is not None:
                    return

        def logprobs_of(ev: TokenEvent, offset: int) -> Optional[dict]:
            return _logprobs_entry(tok, ev, offset) if job.logprobs is not None and ev.token is not None else None

        if body.stream:
            async def sse():
                try:
                    async for piece, ev, offset, finish, n in pieces():
                        choice = {"text": piece, "index": 0, "logprobs": logprobs_of(ev, offset),
                                  "finish_reason": finish, "loops": [ev.depth] if ev.token is not None else []}
                        chunk = {**head, "choices": [choice]}
                        if finish is not None:
                            chunk["usage"] = usage(n)
                        yield f"data: {json.dumps(chunk)}\n\n"
                except RowFailed as err:
                    yield _error_event(500, str(err))
                except ServerStopping as err:
                    yield _error_event(503, str(err))
                finally:  # the client went away (the stream is cancelled) or the row ended: stop its row
                    scheduler.cancel(ticket)
                    stopping.close(events)
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        async def collect():
            out, loops, lps, finish, n = [], [], [], None, 0
            async for piece, ev, offset, finish, n in pieces():
                out.append(piece)
                if ev.token is not None:
                    loops.append(ev.depth)
                    if job.logprobs is not None:
                        lps.append(logprobs_of(ev, offset))
            return "".join(out), loops, lps, finish, n

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():  # watch the connection while the row runs: a client that left is cancelled
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return JSONResponse({}, 499)
            text_out, loops, lps, finish, n = task.result()
        except RowFailed as err:
            return error_response(500, str(err), "server_error")
        except ServerStopping as err:
            return error_response(503, str(err), "server_error")
        finally:
            scheduler.cancel(ticket)
            stopping.close(events)
        choice = {"text": text_out, "index": 0, "logprobs": _merge_logprobs(lps), "finish_reason": finish,
                  "loops": loops, "mean_loops": sum(loops) / len(loops) if loops else None}
        return {**head, "choices": [choice], "usage": usage(n)}

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now so a taken port is a one-line error (SO_REUSEADDR: a restart right after a
    stop does not wait for old connections to time out)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(*, ckpt_path: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          tokenizer: Optional[str] = None, max_batch_size: int = 8, max_request_loops: Optional[int] = None,
          prefill_chunk: int = 256, max_queue: Optional[int] = None, max_lanes: int = 4,
          max_request_bytes: int = MAX_REQUEST_BYTES, special_tokens: bool = False,
          depth_gather: Optional[int] = None, compile: bool = False) -> None:
    """OpenAI-style /v1/completions with continuous batching; each request carries its own depth options.

    Args:
        ckpt_path: the checkpoint to serve.
        host: address to listen on.
        port: port to listen on.
        device: cpu, cuda, ...
        tokenizer: tokenizer.json (default: the run's own or its data folder's).
        max_batch_size: requests decoded together (more wait in a queue).
        max_request_loops: most loops per token a request may ask for (loops / max_loops); default 4 x mu_rec.
        prefill_chunk: prompt tokens prefilled per step, so a long prompt does not stall the running requests.
        max_queue: requests that may wait for a place in the batch (default 4 x max_batch_size); past it a request
            is answered 429 with Retry-After at once.
        max_lanes: distinct depth settings (loops, exit rule, KV policy, ...) decoded at once, each with its own
            max_batch_size full-context KV caches; a request needing another waits in the queue.
        max_request_bytes: the largest request body (default 1 MiB); a larger one is answered 413 unread.
        special_tokens: read special-token spellings in prompts (<|eos|>, <|bos|>) as the control tokens; by default
            they are plain text, so a client cannot inject them.
        depth_gather: N >= 1: requests with an exit rule decode in depth-level ticks (one loop iteration per tick
            for every token, a token that exits early making room for the next one of its request at once), exited
            tokens read out N at a time (1: each at its exit; more: fewer, larger read-out calls); 0: token-level
            steps, each running as many loops as its deepest row. Default: 1 on a GPU, 0 on the CPU (measured
            faster there).
        compile: decode through torch.compile with static shapes (each depth setting's lane compiles on its
            first step; compiled graphs are cached in ~/.cache/parcae/inductor).
    """
    for flag, value in (("max_batch_size", max_batch_size), ("max_request_loops", max_request_loops),
                        ("prefill_chunk", prefill_chunk), ("max_queue", max_queue), ("max_lanes", max_lanes),
                        ("max_request_bytes", max_request_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"--{flag} must be an integer >= 1, got {value!r}")
    if depth_gather is not None and (isinstance(depth_gather, bool) or not isinstance(depth_gather, int)
                                     or depth_gather < 0):
        raise UsageError(f"--depth_gather must be an integer >= 0, got {depth_gather!r}")
    from parcae.runs import load_checkpoint

    try:
        run = load_checkpoint(ckpt_path, device, tokenizer)  # the file opened once, the tokenizer loaded once
        model, tok = run.model, run.tokenizer
        sock = listening_socket(host, port)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    import uvicorn

    app = build_app(model, tok, max_batch_size=max_batch_size, max_request_loops=max_request_loops,
                    prefill_chunk=prefill_chunk, max_queue=max_queue, max_lanes=max_lanes,
                    max_request_bytes=max_request_bytes,
                    special_tokens=special_tokens, depth_gather=depth_gather, compile=compile)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGTERM / SIGINT: every open request ends now (a stream with an error event and [DONE], any other
            with a 503), so uvicorn's wait for them is short and cancels nothing."""
            app.state.stopping.begin()
            super().handle_exit(sig, frame)

    print(f"[serve] POST http://{host}:{port}/v1/completions ({max_batch_size} rows at a time, at most "
          f"{app.state.limits.max_request_loops} loops per token)", flush=True)
    # After the requests end, uvicorn closes the connections, the app's shutdown closes the scheduler, and uvicorn
    # re-raises the signal, which parcae.command_line.interruptible turns into its one line and status 143 / 130.
    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[sock])


if __name__ == "__main__":  # `parcae serve` without importing the training stack
    from parcae.command_line import run_main

    run_main("serve", serve)
