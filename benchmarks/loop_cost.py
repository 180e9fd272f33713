"""Per-sequence depth: proportional-cost looping (ours) vs max-depth masking (the official code).

Both variants run the same model on the same batches with the same sampled per-sequence depths
(truncated Poisson, μ_rec = 8, μ_bwd = 4). The official code runs every sequence to the batch maximum
of no-grad and of grad iterations and freezes finished ones with torch.where; ours computes only the
sequences still looping. The script first checks both give the same loss, then times forward+backward.

    python benchmarks/loop_cost.py                      # CPU defaults (a few minutes on 2 cores)
    python benchmarks/loop_cost.py --batch 32 --steps 5 --d_model 512 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from parcae.model import DepthSampler, LoopedLM, ModelConfig


class MaskedLoopLM(LoopedLM):
    """The official execution: max(n) no-grad then max(k) grad iterations over the whole batch, masked."""

    def _iterate(self, h, drive, counts, iterations, rope, value_embeddings, record):
        mask_shape = (-1,) + (1,) * (h.dim() - 1)
        for t in range(iterations):
            h_new = self.recurrent_step(h, drive, rope, value_embeddings)
            keep_going = (counts > t).to(h.device).view(mask_shape)
            h = torch.where(keep_going, h_new, h)
        return h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(name="bench", vocab_size=4096, block_size=args.seq_len, d_model=args.d_model,
                      n_heads=args.d_model // 64, d_ff=4 * args.d_model, n_prelude=1, n_recurrent=2, n_coda=1,
                      mean_recurrence=8, backprop_depth=4)
    ours = LoopedLM(cfg).to(args.device)
    masked = MaskedLoopLM(cfg).to(args.device)
    masked.load_state_dict(ours.state_dict())
    sampler = DepthSampler.from_config(cfg)
    batches = [(torch.randint(0, 4096, (args.batch, args.seq_len), device=args.device),
                sampler(step, args.batch)) for step in range(args.steps + 1)]

    h0 = torch.zeros(args.batch, args.seq_len, args.d_model, device=args.device)
    ids, depths = batches[0]
    loss_ours = ours(ids, ids, depths=depths, initial_state=h0).loss.item()
    loss_masked = masked(ids, ids, depths=depths, initial_state=h0).loss.item()
    assert abs(loss_ours - loss_masked) < 1e-4, (loss_ours, loss_masked)

    results = {}
    for name, model in (("proportional (ours)", ours), ("max-depth masking (official)", masked)):
        times = []
        for i, (ids, depths) in enumerate(batches):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(ids, ids, depths=depths).loss
            loss.backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first step is warm-up
                times.append(time.perf_counter() - start)
        results[name] = args.batch * args.seq_len * len(times) / sum(times)

    useful = sum(int(d.total.sum()) for _, d in batches[1:])
    masked_rows = sum(args.batch * (int(d.no_grad.max()) + int(d.grad.max())) for _, d in batches[1:])
    print(f"model {sum(p.numel() for p in ours.parameters()):,} params, batch {args.batch}x{args.seq_len}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"recurrent passes per sequence: useful {useful / (args.batch * args.steps):.2f}, "
          f"masked {masked_rows / (args.batch * args.steps):.2f} ({masked_rows / useful:.2f}x)")
    for name, tps in results.items():
        print(f"  {name:<30} {tps:10,.0f} tokens/s")
    print(f"  speed-up: {results['proportional (ours)'] / results['max-depth masking (official)']:.2f}x "
          f"(same loss: {loss_ours:.5f} vs {loss_masked:.5f})")


if __name__ == "__main__":
    main()
