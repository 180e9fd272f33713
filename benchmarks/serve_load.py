"""`parcae serve` under a bounded local load: throughput and latency of N concurrent clients sending requests of
mixed lengths for a fixed time, against a server started from any checkout (to compare the continuous-batching
server with the static-batching one it replaced).

The model is the main job's shape (`mini-demo`: d 64, P/R/C 1/1/1, mu_rec 8, context 256) with random weights,
written to a temporary run directory with the Shakespeare tokenizer. Each client sends one request at a time
(non-streaming, greedy), drawn from a fixed mix: 60% short (8 new tokens), 30% medium (48), 10% long (128), with
a short or a longer prompt. Requests still running when the time is up are waited for and counted.

    python benchmarks/serve_load.py --label continuous                          # this checkout's server
    git archive 1f635f2 parcae | tar -x -C /tmp/static                           # the static-batching server
    python benchmarks/serve_load.py --label static --server_code /tmp/static --server_flags "--batch_timeout 0.05"

Exit rule against fixed depth on a trained checkpoint (issue 28: depth-level batching): every request the same
length (``--max_tokens``), the rule's fields in every request (``--payload``), and each distinct request sent again
alone after the load, its answer compared with the ones under load (``--check_alone``):

    CK=/tmp/democlone/checkpoints/mini_demo/last.ckpt
    python benchmarks/serve_load.py --label fixed --ckpt_path $CK --max_batch_size 16 --max_tokens 64 --check_alone
    python benchmarks/serve_load.py --label latent-diff-depth-level --ckpt_path $CK --max_batch_size 16 \
        --max_tokens 64 --check_alone --payload '{"exit": "latent-diff"}' --server_flags "--depth_gather 1"
    python benchmarks/serve_load.py --label latent-diff-token-level --ckpt_path $CK --max_batch_size 16 \
        --max_tokens 64 --check_alone --payload '{"exit": "latent-diff"}' --server_flags "--depth_gather 0"

(``--depth_gather`` omitted: depth-level ticks on a GPU, token-level steps on the CPU.)
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data_prep" / "corpus" / "shakespeare_tokenizer.json"
MIX = [(0.6, "short", 8), (0.3, "medium", 48), (0.1, "long", 128)]
PROMPTS = ["ROMEO:", "KING HENRY:", "O, what a rogue and peasant slave am I! Is it not monstrous that this player "
           "here, but in a fiction, in a dream of passion, could force his soul so to his own conceit"]


def write_run(root: Path) -> Path:
    from parcae.model import LoopedLM, preset

    cfg = preset("mini-demo")
    torch.manual_seed(0)
    model = LoopedLM(cfg)
    with torch.no_grad():  # the scaled-zero init leaves output projections at 0: give every weight some signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = root / "bench"
    run.mkdir(parents=True)
    torch.save({"hyper_parameters": {"arch": dataclasses.asdict(cfg)},
                "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}, run / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"datasets": [], "tokenizer": str(TOKENIZER)}}))
    return run / "last.ckpt"


def post(port: int, payload: dict, timeout: float = 600) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {body}")
    return body


def start_server(code: Path, ckpt: Path, port: int, flags: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen([sys.executable, "-m", "parcae.inference.serve", "--ckpt_path", str(ckpt),
                             "--port", str(port), *flags], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=code, start_new_session=True)  # cwd: -m imports from it first
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log.read_text())
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def load(port: int, clients: int, duration: float, seed: int, max_tokens: Optional[int] = None,
         payload: Optional[dict] = None) -> tuple[list[dict], float]:
    records: list[dict] = []
    lock = threading.Lock()
    fixed_tokens = max_tokens
    start = time.perf_counter()

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() - start < duration:
            u, acc = rng.random(), 0.0
            for weight, kind, max_tokens in MIX:
                acc += weight
                if u < acc:
                    break
            if fixed_tokens is not None:
                kind, max_tokens = "fixed", fixed_tokens
            prompt = rng.choice(PROMPTS)
            sent = time.perf_counter()
            body = post(port, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **(payload or {})})
            done = time.perf_counter()
            with lock:
                records.append({"kind": kind, "max_tokens": max_tokens, "sent": sent - start, "latency": done - sent,
                                "tokens": body["usage"]["completion_tokens"], "prompt": prompt,
                                "text": body["choices"][0]["text"]})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def summary(records: list[dict], elapsed: float) -> dict:
    out = {"requests": len(records), "elapsed_s": round(elapsed, 1),
           "tokens_per_s": round(sum(r["tokens"] for r in records) / elapsed, 1),
           "requests_per_s": round(len(records) / elapsed, 2)}
    for kind in (None, "short", "medium", "long", "fixed"):
        lat = [r["latency"] for r in records if kind is None or r["kind"] == kind]
        name = kind or "all"
        if not lat and kind is not None:
            continue
        out[f"{name}_n"] = len(lat)
        out[f"{name}_p50_s"] = round(percentile(lat, 50), 2)
        out[f"{name}_p99_s"] = round(percentile(lat, 99), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True)
    p.add_argument("--server_code", default=str(ROOT), help="checkout whose parcae/ runs the server")
    p.add_argument("--server_flags", default="", help="extra flags for parcae serve")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    p.add_argument("--ckpt_path", default=None, help="serve this checkpoint (default: mini-demo, random weights)")
    p.add_argument("--max_tokens", type=int, default=None, help="every request this many tokens (not the mix)")
    p.add_argument("--payload", default="{}", help="JSON fields added to every request, e.g. '{\"exit\": \"kl\"}'")
    p.add_argument("--check_alone", action="store_true",
                   help="after the load, send each distinct request alone and compare its answer with the loaded ones")
    args = p.parse_args()
    payload = json.loads(args.payload)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt_path) if args.ckpt_path else write_run(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        flags = ["--max_batch_size", str(args.max_batch_size), *shlex.split(args.server_flags)]
        log = Path(tmp) / "server.log"
        proc = start_server(Path(args.server_code), ckpt, port, flags, log)
        try:
            post(port, {"prompt": "warm up", "max_tokens": 4, "temperature": 0})
            alone = {}   # each kind of request by itself on the idle server: the per-token cost without load
            for _, kind, max_tokens in MIX:
                sent = time.perf_counter()
                post(port, {"prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0})
                alone[f"alone_{kind}_s"] = round(time.perf_counter() - sent, 2)
            records, elapsed = load(port, args.clients, args.duration, args.seed, args.max_tokens, payload)
            if args.check_alone:   # each distinct request on the idle server: the same answer as under load?
                answers: dict = {}
                for r in records:
                    answers.setdefault((r["prompt"], r["max_tokens"]), set()).add(r["text"])
                differ = 0
                for (prompt, max_tokens), texts in answers.items():
                    body = post(port, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **payload})
                    differ += sum(t != body["choices"][0]["text"] for t in texts)
                alone["answers_equal_alone"] = differ == 0
                alone["distinct_requests"] = len(answers)
        finally:
            stop_server(proc)
    result = {"label": args.label, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"load {os.getloadavg()[0]:.1f}", "torch": torch.__version__,
              "clients": args.clients, "duration_s": args.duration, "max_batch_size": args.max_batch_size,
              "server_flags": args.server_flags, "checkpoint": args.ckpt_path or "mini-demo (random weights)",
              "payload": payload, "max_tokens": args.max_tokens, **alone, **summary(records, elapsed)}
    print(json.dumps(result, indent=1))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*previous, result], indent=1) + "\n")
    print(f"[serve_load] appended to {out}")


if __name__ == "__main__":
    main()
