"""Training throughput of the paper recipes on one GPU: tokens/s, MFU, peak memory, whether the micro-batch fits.

Each recipe's model, micro-batch (data.batch_size x seq_len), optimizer and activation-checkpointing flag are
read from the recipe; random tokens stand in for data. One measurement = a plain training step (bf16 autocast,
sampled per-sequence depths, clip 1.0, optimizer step) repeated ``--steps`` times after ``--warmup`` steps, eager
or with each block compiled (what ``model.compile: true`` does). FLOPs per step count the depths actually
sampled (parcae.model.flops_per_token); MFU divides by the peak given (``--peak_tflops``) or Lightning's table.

    python benchmarks/gpu_throughput.py --out_md /tmp/throughput.md            # all of RECIPES, eager + compile
    python benchmarks/gpu_throughput.py --recipes table5_140m_parcae --modes eager --steps 5

Used by benchmarks/gpu_check.sh. Stops starting new measurements when ``--budget_s`` is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = ["table5_140m_parcae", "table5_370m_parcae", "table5_770m_parcae", "table5_1.3b_parcae", "table5_140m_gpt"]
PEAK_BF16_TFLOPS_BY_NAME = {"H200": 989.4, "H100": 989.4, "GH200": 989.4}  # dense bf16, SXM datasheets


def peak_tflops(device: torch.device, explicit: str) -> tuple[float | None, str]:
    if explicit not in ("", "auto"):
        return float(explicit), "given"
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16)
    if flops:
        return flops / 1e12, "Lightning's table"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS_BY_NAME.items():
        if key in name:
            return value, f"datasheet ({key})"
    return None, f"unknown for {name!r}: pass --peak_tflops"


def _as_dict(value) -> dict:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def measure(recipe: str, compiled: bool, steps: int, warmup: int, peak: float | None, device: torch.device) -> dict:
    from parcae.training.run import model_config_of, parse_recipe
    from parcae.model import DepthSampler, LoopedLM, flops_per_token
    from parcae.training.optim import OptimizerConfig, build_optimizer

    cfg = parse_recipe(ROOT / "recipes" / f"{recipe}.yaml", resolve=False)
    arch = model_config_of(cfg)
    B, S = int(cfg.data.batch_size), int(cfg.data.seq_len)
    row = {"recipe": recipe, "mode": "compile" if compiled else "eager", "micro_batch": f"{B} x {S}",
           "activation_checkpointing": bool(cfg.model.activation_checkpointing)}
    net = opt = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            net = LoopedLM(arch)
        net.checkpoint_iterations = row["activation_checkpointing"]
        row["parameters"] = sum(p.numel() for p in net.parameters())
        if compiled:
            for block in [*net.prelude, *net.recurrent, *net.coda]:
                block.compile(dynamic=None)
        optimizer = {k: v for k, v in _as_dict(cfg.model.optimizer).items()
                     if k in {f.name for f in dataclasses.fields(OptimizerConfig)}}
        opt = build_optimizer(net, OptimizerConfig(**optimizer))
        sampler = DepthSampler.from_config(arch) if arch.looped else None
        tokens = torch.randint(0, arch.vocab_size, (warmup + steps, B, S + 1), device=device)
        flops, start = 0.0, None
        for step in range(warmup + steps):
            if step == warmup:
                torch.cuda.synchronize(device)
                start = time.perf_counter()
            x, y = tokens[step, :, :-1], tokens[step, :, 1:]
            depths = sampler(step, B) if sampler is not None else None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(x, y, depths=depths).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= warmup:
                split = ({"no_grad_iterations": depths.no_grad.float().mean().item(),
                          "grad_iterations": depths.grad.float().mean().item()} if depths is not None else {})
                flops += flops_per_token(arch, S, **split).per_token * B * S
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        row.update(fits=True, loss=loss.item(), step_s=elapsed / steps, tokens_per_s=B * S * steps / elapsed,
                   tflops=flops / elapsed / 1e12)
        row["mfu"] = row["tflops"] / peak if peak else None
    except torch.cuda.OutOfMemoryError as err:
        row.update(fits=False, error=str(err).splitlines()[0][:160])
    except Exception as err:  # e.g. a compiler failure: record it and go on with the next measurement
        row.update(fits=None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
    finally:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del net, opt
        gc.collect()
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], peak: float | None, source: str) -> str:
    lines = [f"Peak bf16 FLOP/s for MFU: {peak:.1f} TFLOP/s ({source})." if peak else f"MFU: n/a ({source}).", "",
             "| recipe | params | micro-batch | act. ckpt | mode | fits | tokens/s | TFLOP/s | MFU | peak mem GiB | step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['recipe']} | | | | {r['mode']} | not run: {r['skipped']} | | | | | |")
            continue
        ok = r.get("fits")
        fmt = (lambda k, f: f.format(r[k]) if ok and r.get(k) is not None else "-")
        fits = "yes" if ok else "no (OOM)" if ok is False else f"error: {r.get('error', '?')}".replace("|", "/")
        lines.append(f"| {r['recipe']} | {r.get('parameters', 0) / 1e6:,.0f}M | {r['micro_batch']} | "
                     f"{'yes' if r['activation_checkpointing'] else 'no'} | {r['mode']} | "
                     f"{fits} | {fmt('tokens_per_s', '{:,.0f}')} | {fmt('tflops', '{:.1f}')} | "
                     f"{fmt('mfu', '{:.1%}')} | {r['peak_memory_gib']:.1f} | {fmt('step_s', '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--peak_tflops", default="auto", help="peak bf16 TFLOP/s of the GPU for MFU (auto: look up)")
    p.add_argument("--budget_s", type=float, default=300.0, help="start no new measurement after this many seconds")
    p.add_argument("--out_md", default=None)
    p.add_argument("--out_json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput: no CUDA GPU visible (torch.cuda.is_available() is False); nothing measured")
    device = torch.device("cuda", 0)
    peak, source = peak_tflops(device, args.peak_tflops)
    begin, rows = time.perf_counter(), []
    for mode in args.modes.split(","):
        for recipe in args.recipes.split(","):
            spent = time.perf_counter() - begin
            if spent > args.budget_s or (mode == "compile" and args.budget_s - spent < 45):
                rows.append({"recipe": recipe, "mode": mode, "skipped": f"time budget ({args.budget_s:.0f} s) spent"})
                print(f"[gpu_throughput] {recipe} {mode}: skipped (budget)", flush=True)
                continue
            row = measure(recipe, mode == "compile", args.steps, args.warmup, peak, device)
            rows.append(row)
            print(f"[gpu_throughput] {json.dumps(row)}", flush=True)
            _write(rows, peak, source, args)  # after every measurement: a timeout keeps what was measured
    print(_write(rows, peak, source, args))


def _write(rows: list[dict], peak, source: str, args) -> str:
    table = markdown(rows, peak, source)
    if args.out_md:
        Path(args.out_md).write_text(table)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(rows, indent=1))
    return table


if __name__ == "__main__":
    main()
