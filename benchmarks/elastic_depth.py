"""Loss against mean loops and against forward FLOPs per token for a trained checkpoint on held-out text: fixed
T = 1..16 and every exit rule over a range of thresholds, all teacher-forced through the KV-cached engine
(parcae.inference.elastic).

    python benchmarks/elastic_depth.py --ckpt_path checkpoints/mini_demo/last.ckpt        # ~3 minutes on 2 CPU cores
    python benchmarks/elastic_depth.py --ckpt_path ... --work tempest --windows 16 --window 128 --kv_policy latest

The held-out text is a validation play of the embedded Shakespeare corpus (not used to train the tokenizer or the
miniature). Every setting scores the same tokens, so differences between settings are paired. "Mean loops" is
the mean number of recurrent iterations each prediction used; with ``--kv_policy latest`` (the default) that is
also what was computed. "FLOPs per token" counts what was computed, exit checks included: the output-based rules
(kl, minp-kl, entropy-diff, argmax-stability) read every checked iteration out through C, the coda and the head
(parcae.model.flops.inference_flops_per_token). Writes <out>.json and <out>.png (both axes).
"""

from __future__ import annotations

import argparse
import json
import lzma
import time
from pathlib import Path

import torch

from parcae.runs import load_checkpoint
from parcae.inference import AUTO_THRESHOLDS, Engine
from parcae.inference.elastic import elastic_nll

THRESHOLDS = {
    "latent-diff": [0.3, 0.2, 0.1, 0.05, 0.03, 0.01],
    "cosine": [1e-2, 3e-3, 1e-3, 3e-4, 1e-4],
    "kl": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4],
    "minp-kl": [1e-3, 1e-4, 1e-5, 1e-6],
    "entropy-diff": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4],
    "argmax-stability": [1, 2, 3, 5, 8],
}


def held_out_ids(tok, work: str, n_tokens: int) -> list[int]:
    from data_prep.shakespeare import CORPUS

    for line in lzma.open(CORPUS, "rt", encoding="utf-8"):
        record = json.loads(line)
        if record["id"] == work:
            ids = tok.encode(record["text"], add_special_tokens=False).ids
            return [tok.token_to_id("<|bos|>"), *ids[:n_tokens]]
    raise SystemExit(f"no work {work!r} in {CORPUS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--work", default="tempest", help="corpus id of a held-out play")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--max_loops", type=int, default=16)
    p.add_argument("--kv_policy", default="latest")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/inference/loss_vs_loops"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.ckpt_path, "cpu")
    model, tok = loaded.model, loaded.tokenizer
    ids = held_out_ids(tok, args.work, args.windows * (args.window - 1))
    rows = []

    def run(label, engine):
        start = time.perf_counter()
        row = elastic_nll(engine, ids, args.window, batch_size=args.windows)
        row["setting"] = label
        rows.append(row)
        print(f"[elastic] {label:<28} loss {row['loss']:.4f}  mean loops {row['mean_loops']:.2f}  "
              f"{row['flops_per_token'] / 1e6:.2f} MFLOP/token  ({time.perf_counter() - start:.0f} s)", flush=True)

    for T in range(1, args.max_loops + 1):  # noqa: B007
        run(f"fixed T={T}", Engine(model, loops=T))
    for rule, thresholds in THRESHOLDS.items():
        for thr in thresholds:
            run(f"{rule}:{thr:g}", Engine(model, exit=f"{rule}:{thr}", max_loops=args.max_loops,
                                          kv_policy=args.kv_policy))
    payload = {"checkpoint": str(args.ckpt_path), "model": model.config.name, "text": args.work,
               "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
               "mean_recurrence": model.config.mean_recurrence,
               "tokens": rows[0]["tokens"], "window": args.window, "max_loops": args.max_loops,
               "kv_policy": args.kv_policy, "auto_thresholds": AUTO_THRESHOLDS, "results": rows}
    payload["summary"] = summarize(rows, args.max_loops)
    for line in payload["summary"]["lines"]:
        print("[elastic] " + line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, args.out.with_suffix(".png"))
    print(f"written: {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")


def summarize(rows: list[dict], max_loops: int) -> dict:
    """Each rule against fixed depth at equal compute (fixed-depth loss interpolated at the rule's mean loops), and
    what the auto thresholds save against running max_loops and against the fixed depth that matches their loss."""
    import numpy as np

    fixed = sorted((r["mean_loops"], r["loss"], r["flops_per_token"]) for r in rows if r["exit"] is None)
    fx, fy, ff = (np.array([f[i] for f in fixed]) for i in range(3))
    per_rule, lines = {}, []
    for rule in THRESHOLDS:
        pts = [r for r in rows if r["exit"] and r["exit"].startswith(rule + ":")]
        gaps = [r["loss"] - float(np.interp(r["mean_loops"], fx, fy)) for r in pts]
        flop_gaps = [r["loss"] - float(np.interp(r["flops_per_token"], ff, fy)) for r in pts]
        auto = next(r for r in pts if float(r["exit"].split(":")[1]) == AUTO_THRESHOLDS[rule])
        match = next((int(T) for T, loss, _ in fixed if loss <= auto["loss"] + 1e-12), None)
        per_rule[rule] = {"mean_gap_vs_fixed": float(np.mean(gaps)), "min_gap_vs_fixed": float(np.min(gaps)),
                          "mean_gap_vs_fixed_at_equal_flops": float(np.mean(flop_gaps)),
                          "min_gap_vs_fixed_at_equal_flops": float(np.min(flop_gaps)),
                          "auto_mean_loops": auto["mean_loops"], "auto_flops_per_token": auto["flops_per_token"],
                          "auto_loss": auto["loss"], "fixed_T_matching_auto_loss": match}
        lines.append(f"{rule:<17} loss - fixed at equal mean loops: mean {np.mean(gaps):+.4f}, best {np.min(gaps):+.4f};"
                     f" at equal FLOPs: mean {np.mean(flop_gaps):+.4f}, best {np.min(flop_gaps):+.4f}; auto: "
                     f"{auto['mean_loops']:.2f} loops/token, {auto['flops_per_token'] / 1e6:.2f} MFLOP/token, loss "
                     f"{auto['loss']:.4f}; fixed depth needs T = {match}")
    best_fixed = int(fx[int(np.argmin(fy))])
    lines.append(f"best fixed depth: T = {best_fixed}, loss {fy.min():.4f}")
    return {"per_rule": per_rule, "best_fixed_T": best_fixed, "best_fixed_loss": float(fy.min()), "lines": lines}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    fixed = [r for r in rows if r["exit"] is None]
    for ax, key, xlabel, scale in ((axes[0], "mean_loops", "mean loops per token", 1),
                                   (axes[1], "flops_per_token", "forward MFLOPs per token (exit checks included)",
                                    1e6)):
        ax.plot([r[key] / scale for r in fixed], [r["loss"] for r in fixed], "k-o", ms=3,
                label=f"fixed T = 1..{len(fixed)}")
        for rule, marker in zip(THRESHOLDS, "s^Dv<>"):
            pts = sorted((r for r in rows if r["exit"] and r["exit"].startswith(rule + ":")), key=lambda r: r[key])
            line, = ax.plot([r[key] / scale for r in pts], [r["loss"] for r in pts], marker=marker, ms=4, lw=1,
                            label=rule)
            auto = next((r for r in pts if float(r["exit"].split(":")[1]) == AUTO_THRESHOLDS[rule]), None)
            if auto is not None:
                ax.plot(auto[key] / scale, auto["loss"], marker=marker, ms=10, mfc="none", color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    # T = 1 sits far above the rest: zoom on T >= 2, where the rules differ, and say where T = 1 is
    by_T = {r["loops"]: r["loss"] for r in fixed}
    mu = payload.get("mean_recurrence")
    if 2 in by_T:
        axes[0].set_ylim(min(r["loss"] for r in rows) - 0.002, by_T[2] + 0.01)
        axes[0].annotate(f"T = 1: {by_T[1]:.3f} (above)", (0.55, 0.96), xycoords="axes fraction", fontsize=8)
    if mu in by_T:
        for ax in axes:
            ax.axhline(by_T[mu] + 0.01, color="grey", ls="--", lw=0.8)
        axes[1].annotate(f"fixed μ_rec = {mu} + 0.01 nats", (0.55, 0.9), xycoords="axes fraction", fontsize=8,
                         color="grey")
    axes[0].set_ylabel("held-out loss (nats/token)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{payload['model']} on {payload['text']} ({payload['tokens']:,} tokens), max_loops "
                 f"{payload['max_loops']}, kv {payload['kv_policy']}; large marker = auto threshold", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
