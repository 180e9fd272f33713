"""``parcae serve``: an OpenAI-compatible text-completions server (LitServe) over the KV-cached engine.

    parcae serve --ckpt_path checkpoints/mini_demo/last.ckpt --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8, "stream": true}'

``POST /v1/completions`` takes OpenAI's text-completion fields (``prompt``, ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``stream``, ``seed``) plus the depth options of ``parcae generate`` as extra fields
(``loops``, ``exit``, ``min_loops``, ``max_loops``, ``kv_policy``, ``continuous``, ``top_k``). Each choice also reports
the loops used per token (``loops``, ``mean_loops``). Requests that arrive together (up to ``--max_batch_size``
within ``--batch_timeout`` seconds) are generated as one batch; requests with different depth options in one
batch are run group by group. A bad request gets a 4xx with the reason and the server keeps serving.

LitServe's ready OpenAI spec serves chat completions; a base model continues text, so this module has its own
small spec for ``/v1/completions``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import deque
from typing import Optional, Union

import litserve as ls
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel, Field

from parcae.data.tokenizer import encode_prompt

from .engine import Engine, Sampling


class CompletionRequest(BaseModel):
    model: Optional[str] = None
    prompt: Union[str, list[str]] = ""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    seed: Optional[int] = None
    n: int = 1
    # parcae extras: depth and sampling options of `parcae generate`
    top_k: Optional[int] = None
    loops: Optional[int] = None
    exit: Optional[str] = Field(default=None, description="RULE[:THRESHOLD], e.g. kl:1e-3")
    min_loops: int = 1
    max_loops: Optional[int] = None
    kv_policy: str = "full"
    continuous: bool = False


def depth_key(r: CompletionRequest) -> tuple:
    return (r.loops, r.exit, r.min_loops, r.max_loops, r.kv_policy, r.continuous)


class CompletionsSpec(LitSpec):
    """/v1/completions: validates the request (400 with the reason), queues it, streams or collects the answer."""

    def __init__(self, validate) -> None:
        super().__init__()
        self.api_path = "/v1/completions"
        self.validate = validate  # request -> None or raises ValueError
        self.add_endpoint(self.api_path, self.completions, ["POST"])

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        yield from output

    async def completions(self, request: CompletionRequest):
        if isinstance(request.prompt, list):
            if len(request.prompt) != 1:
                raise HTTPException(400, "send one prompt per request (batching happens across requests)")
            request.prompt = request.prompt[0]
        if request.n != 1:
            raise HTTPException(400, "n must be 1")
        try:
            self.validate(request)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        uid = uuid.uuid4()
        q, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), request))
        pieces = self.data_streamer(q, event, send_status=True)
        ident, created = f"cmpl-{uid.hex[:12]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": request.model or "parcae"}

        async def chunks():
            async for raw, status in pieces:
                if status == LitAPIStatus.ERROR:
                    raise raw if isinstance(raw, HTTPException) else HTTPException(500, "generation failed")
                if status == LitAPIStatus.FINISH_STREAMING:
                    return
                if raw:
                    yield json.loads(raw)

        if request.stream:
            async def sse():
                try:
                    async for c in chunks():
                        choice = {"text": c["text"], "index": 0, "logprobs": None, "finish_reason": c["finish_reason"],
                                  "loops": c["loops"]}
                        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                except HTTPException as err:
                    yield f"data: {json.dumps({'error': {'message': err.detail, 'code': err.status_code}})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        text, loops, finish, usage = [], [], None, {}
        async for c in chunks():
            text.append(c["text"])
            loops += c["loops"]
            finish = c["finish_reason"] or finish
            usage = c["usage"] or usage
        choice = {"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": finish, "loops": loops,
                  "mean_loops": sum(loops) / len(loops) if loops else None}
        return {**head, "choices": [choice], "usage": usage}


class CompletionsAPI(ls.LitAPI):
    def __init__(self, ckpt_path: str, tokenizer: Optional[str] = None, device: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.ckpt_path, self.tokenizer_path, self.device_name = ckpt_path, tokenizer, device

    def setup(self, device) -> None:
        from parcae.data import load_tokenizer
        from parcae.runs.checkpoint import load_checkpoint

        self.model, tok_path = load_checkpoint(self.ckpt_path, self.device_name or device, self.tokenizer_path)
        self.tok = load_tokenizer(str(tok_path))
        self.eos = self.tok.token_to_id("<|eos|>")

    def decode_request(self, request: CompletionRequest):
        return request

    def batch(self, inputs):
        return list(inputs)

    def unbatch(self, output):
        yield from output

    def predict(self, requests: list):
        """One list per step with an entry per request ("" where that request has nothing new)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(depth_key(r), []).append(i)
        for rows in groups.values():
            yield from self._generate_group(requests, rows)

    def _generate_group(self, requests: list, rows: list[int]):
        first = requests[rows[0]]
        engine = Engine(self.model, loops=first.loops, exit=first.exit, min_loops=first.min_loops,
                        max_loops=first.max_loops, kv_policy=first.kv_policy, continuous=first.continuous)
        reqs = [requests[i] for i in rows]
        prompts = [encode_prompt(self.tok, r.prompt) for r in reqs]
        sampling = [Sampling(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p if r.top_p < 1 else None,
                             seed=r.seed or 0) for r in reqs]
        stops = [[r.stop] if isinstance(r.stop, str) else list(r.stop or []) for r in reqs]
        generated = [[] for _ in reqs]
        shown = ["" for _ in reqs]
        halt: set[int] = set()
        for event in engine.stream(prompts, max(r.max_tokens for r in reqs), sampling, [self.eos],
                                   limits=[r.max_tokens for r in reqs], halt=halt):
            out = ["" for _ in requests]
            for j, r in enumerate(reqs):
                if not event.active[j]:
                    continue
                generated[j].append(event.tokens[j])
                text = self.tok.decode(generated[j], skip_special_tokens=True)
                finish = None
                cut = min((text.find(s) for s in stops[j] if s and s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    halt.add(j)
                elif event.finished[j]:
                    finish = "stop" if event.tokens[j] == self.eos else "length"
                if text.endswith("\ufffd") and finish is None:
                    delta = ""  # half a multi-byte character: wait for the rest
                else:
                    delta, shown[j] = text[len(shown[j]):], text
                usage = None
                if finish is not None:
                    usage = {"prompt_tokens": len(prompts[j]), "completion_tokens": len(generated[j]),
                             "total_tokens": len(prompts[j]) + len(generated[j])}
                out[rows[j]] = {"text": delta, "loops": [event.depths[j]], "finish_reason": finish, "usage": usage}
            yield out

    def encode_response(self, output):
        yield from output


class RequestValidator:
    """Checks a request against the model in the server process, before it can reach (and fail) a batch.

    Picklable (LitServe ships the spec to its workers): the model and tokenizer load on first use."""

    def __init__(self, ckpt_path: str, tokenizer: Optional[str]) -> None:
        self.ckpt_path, self.tokenizer = ckpt_path, tokenizer
        self._loaded = None

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None}

    def load(self):
        if self._loaded is None:
            from parcae.data import load_tokenizer
            from parcae.runs.checkpoint import load_checkpoint

            model, tok_path = load_checkpoint(self.ckpt_path, "cpu", self.tokenizer)
            self._loaded = model, load_tokenizer(str(tok_path))
        return self._loaded

    def __call__(self, r: CompletionRequest) -> None:
        model, tok = self.load()
        if r.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {r.max_tokens}")
        if not 0 < r.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {r.top_p}")
        Sampling(temperature=r.temperature, top_k=r.top_k)
        engine = Engine(model, loops=r.loops, exit=r.exit, min_loops=r.min_loops, max_loops=r.max_loops,
                        kv_policy=r.kv_policy, continuous=r.continuous)
        ids = encode_prompt(tok, r.prompt)
        engine.check_request([ids], r.max_tokens)


def build_server(ckpt_path: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
                 max_batch_size: int = 8, batch_timeout: float = 0.05) -> ls.LitServer:
    validator = RequestValidator(ckpt_path, tokenizer)
    validator.load()  # fail now on a bad checkpoint, with one line
    spec = CompletionsSpec(validator)
    api = CompletionsAPI(ckpt_path, tokenizer, device, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         spec=spec)
    return ls.LitServer(api, accelerator="cpu" if device in (None, "cpu") else "auto", devices=1,
                        workers_per_device=1, timeout=600)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="parcae serve", description="OpenAI-compatible /v1/completions over LitServe.")
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max_batch_size", type=int, default=8, help="requests generated together")
    p.add_argument("--batch_timeout", type=float, default=0.05, help="seconds to wait to fill a batch")
    args = p.parse_args(argv)
    try:
        if args.max_batch_size < 1:
            raise ValueError(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
        server = build_server(args.ckpt_path, args.tokenizer, args.device, args.max_batch_size, args.batch_timeout)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"parcae serve: error: {err}")
    print(f"[serve] POST http://{args.host}:{args.port}/v1/completions", flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
