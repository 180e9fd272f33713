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
an asyncio queue per request. A client that disconnects has its row cancelled. SIGTERM or Ctrl-C stops the
server within a few seconds (requests still running are cut). docs/inference.md says why this is not LitServe.
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

from parcae.data.tokenizer import TextStream, encode_prompt, stop_ids
from parcae.errors import UsageError

from .engine import Sampling
from .options import DepthOptions
from .scheduler import Job, Scheduler, TokenEvent

MAX_LOGPROBS = 20       # top-N log-probabilities a request may ask for
SEED_LIMIT = 2**64      # request seeds are unsigned 64-bit integers (torch's generator range)


class CompletionRequest(BaseModel):
    """The request body. Strict types: ``true`` or ``"4"`` is not a number; unknown fields are refused."""
    model_config = ConfigDict(strict=True, extra="forbid")

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


class Limits:
    """What one request may ask for, checked against the model before it is queued."""

    def __init__(self, model, tok, max_request_loops: int) -> None:
        self.model, self.tok, self.max_request_loops = model, tok, max_request_loops

    def job(self, r: CompletionRequest) -> tuple[Job, list[str]]:
        """(the job, its stop strings) or BadRequest with the reason. Each request is checked alone."""
        if isinstance(r.prompt, list):
            if len(r.prompt) != 1:
                raise BadRequest("send one prompt per request (batching happens across requests)")
            r.prompt = r.prompt[0]
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
        ids = encode_prompt(self.tok, r.prompt)
        context = self.model.config.block_size
        if len(ids) + r.max_tokens > context:
            raise BadRequest(f"the prompt is {len(ids)} tokens; with max_tokens={r.max_tokens} that exceeds the "
                             f"model's context of {context} tokens (shorten the prompt or ask for fewer tokens)")
        # an unseeded sampled request draws its own seed (reported in the answer), so repeats differ
        seed = r.seed if r.seed is not None else secrets.randbits(63)
        stops = [s for s in ([r.stop] if isinstance(r.stop, str) else (r.stop or [])) if s]
        return Job(ids, r.max_tokens, depth, sampling, seed, r.logprobs), stops


class StopText:
    """The answer's text as it becomes final (:class:`parcae.data.tokenizer.TextStream`), cut before the first
    stop string; text that could be the start of a stop string is held back until it is known not to be, so a
    stop string split over tokens never leaks its first part into the answer."""

    def __init__(self, tok, stops: list[str]) -> None:
        self.stream, self.stops, self.shown, self.stopped = TextStream(tok), stops, "", False

    def add(self, token: Optional[int], last: bool) -> str:
        """The next piece of the answer after ``token`` (``last``: the row has ended)."""
        if token is not None:
            self.stream.push(token)
        text = self.stream.text
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        elif not last:
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        piece, self.shown = text[len(self.shown):], text
        return piece


def _logprobs_entry(tok, event: TokenEvent, offset: int) -> dict:
    name = lambda i: tok.decode([i], skip_special_tokens=False)  # noqa: E731
    return {"tokens": [name(event.token)], "token_ids": [event.token], "token_logprobs": [event.logprob],
            "top_logprobs": [{name(i): lp for i, lp in event.top}], "text_offset": [offset]}


def _merge_logprobs(parts: list[dict]) -> Optional[dict]:
    if not parts:
        return None
    return {k: [v for p in parts for v in p[k]] for k in parts[0]}


def build_app(model, tok, *, max_batch_size: int = 8, max_request_loops: Optional[int] = None,
              prefill_chunk: int = 256):
    """The FastAPI app over one model (loaded by the caller) and one scheduler thread."""
    limits = Limits(model, tok, max_request_loops or 4 * model.config.mean_recurrence)
    scheduler = Scheduler(model, max_rows=max_batch_size, stop_ids=stop_ids(tok), prefill_chunk=prefill_chunk)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="parcae", lifespan=lifespan)
    app.state.scheduler, app.state.limits = scheduler, limits

    def refuse(message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": 400}}, 400)

    @app.get("/health")
    async def health():
        if not scheduler.running:
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
        try:  # the body is JSON whatever the Content-Type says (curl -d sends a form type)
            body = CompletionRequest.model_validate_json(await request.body())
        except ValidationError as err:
            return refuse(describe(err))
        try:
            job, stops = limits.job(body)
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
        ticket = scheduler.submit(job, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        text = StopText(tok, stops)

        async def pieces():
            """(text piece, event, finish_reason, tokens so far) per token until the row ends."""
            n = 0
            while True:
                ev: TokenEvent = await events.get()
                if ev.finish == "error":
                    raise RuntimeError(ev.error)
                if ev.token is not None:
                    n += 1
                offset = len(text.stream.text)  # where this token's text starts (logprobs' text_offset)
                piece = text.add(ev.token, ev.finish is not None)
                finish = "stop" if text.stopped else ev.finish
                if text.stopped and ev.finish is None:
                    scheduler.cancel(ticket)   # a stop string: the row leaves at the next step
                yield piece, ev, offset, finish, n
                if finish is not None:
                    return

        def logprobs_of(ev: TokenEvent, offset: int) -> Optional[dict]:
            return _logprobs_entry(tok, ev, offset) if job.logprobs and ev.token is not None else None

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
                except RuntimeError as err:
                    yield f"data: {json.dumps({'error': {'message': str(err), 'code': 500}})}\n\n"
                finally:  # the client went away (the stream is cancelled) or the row ended: stop its row
                    scheduler.cancel(ticket)
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        async def collect():
            out, loops, lps, finish, n = [], [], [], None, 0
            async for piece, ev, offset, finish, n in pieces():
                out.append(piece)
                if ev.token is not None:
                    loops.append(ev.depth)
                    if job.logprobs:
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
        except RuntimeError as err:
            return JSONResponse({"error": {"message": str(err), "type": "server_error", "code": 500}}, 500)
        finally:
            scheduler.cancel(ticket)
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
          prefill_chunk: int = 256) -> None:
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
    """
    for flag, value in (("max_batch_size", max_batch_size), ("max_request_loops", max_request_loops),
                        ("prefill_chunk", prefill_chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"--{flag} must be an integer >= 1, got {value!r}")
    from parcae.runs import load_checkpoint

    try:
        run = load_checkpoint(ckpt_path, device, tokenizer)  # the file opened once, the tokenizer loaded once
        model, tok = run.model, run.tokenizer
        sock = listening_socket(host, port)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    import uvicorn

    app = build_app(model, tok, max_batch_size=max_batch_size, max_request_loops=max_request_loops,
                    prefill_chunk=prefill_chunk)
    print(f"[serve] POST http://{host}:{port}/v1/completions ({max_batch_size} rows at a time, at most "
          f"{app.state.limits.max_request_loops} loops per token)", flush=True)
    # On SIGTERM/SIGINT uvicorn stops accepting, gives running requests 2 s, then re-raises the signal, which
    # parcae.command_line.interruptible turns into its one line and status 143 / 130.
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[sock])


if __name__ == "__main__":  # `parcae serve` without importing the training stack
    from parcae.command_line import run_main

    run_main("serve", serve)
