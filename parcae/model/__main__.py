"""Inspect a model preset: parameters by part, FLOPs per token and (unless --meta) one training forward.

    python -m parcae.model parcae-debug           # builds it, runs a forward + backward, prints telemetry
    python -m parcae.model parcae-140m gpt-140m --meta
"""

import argparse

import torch

from . import DepthSampler, LoopedLM, flops_per_token, preset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="parcae model", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["parcae-debug"])
    parser.add_argument("--meta", action="store_true", help="shape-only build: no weights, no forward")
    args = parser.parse_args(argv)
    for name in args.presets:
        try:
            cfg = preset(name)
        except ValueError as err:  # an unknown name: the message lists the known presets
            raise SystemExit(f"parcae model: error: {err}") from None
        with torch.device("meta" if args.meta else "cpu"):
            model = LoopedLM(cfg)
        counts = model.parameter_counts()
        print(f"{name}: {counts.pop('total'):,} parameters; effective depth {cfg.effective_depth()} blocks")
        print("  " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        for convention in ("paper", "official"):
            fb = flops_per_token(cfg, convention=convention)
            print(f"  FLOPs/token [{convention}]: {fb.per_token / 1e9:.3f} G (core {fb.core_params:,} params, "
                  f"other {fb.other_params:,}, attention {fb.attention / 1e9:.3f} G)")
        if args.meta:
            continue
        ids = torch.randint(0, cfg.vocab_size, (4, min(64, cfg.block_size)))
        depths = DepthSampler.from_config(cfg)(step=1, batch_size=4) if cfg.looped else None
        out = model(ids, ids, depths=depths, telemetry=cfg.looped)
        out.loss.backward()
        print(f"  loss {out.loss.item():.4f} (ln V = {torch.tensor(float(cfg.padded_vocab_size)).log():.4f})")
        for key, value in (out.telemetry or {}).items():
            print(f"  {key}: {[round(v, 4) for v in value.tolist()] if value.dim() else round(value.item(), 4)}")


if __name__ == "__main__":
    main()
