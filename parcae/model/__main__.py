"""``parcae model``: inspect model presets: parameters by part, FLOPs per token and (unless --meta) one training
forward.

    parcae model parcae-debug           # builds it, runs a forward + backward, prints telemetry
    parcae model parcae-140m gpt-140m --meta     # or python -m parcae.model ..., without the training stack
"""

from __future__ import annotations

import torch

from parcae.errors import UsageError

from . import DepthSampler, LoopedLM, flops_per_token, preset


def inspect_presets(presets: list[str] = ["parcae-debug"], /, *, meta: bool = False) -> None:  # noqa: B006
    """Inspect model presets: parameters by part, FLOPs per token and (unless --meta) one training forward.

    Args:
        presets: preset names (parcae.model.PRESETS).
        meta: shape-only build: no weights, no forward.
    """
    for name in presets:
        try:
            cfg = preset(name)
        except ValueError as err:  # an unknown name: the message lists the known presets
            raise UsageError(str(err)) from None
        with torch.device("meta" if meta else "cpu"):
            model = LoopedLM(cfg)
        counts = model.parameter_counts()
        print(f"{name}: {counts.pop('total'):,} parameters; effective depth {cfg.effective_depth()} blocks")
        print("  " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        for convention in ("paper", "official"):
            fb = flops_per_token(cfg, convention=convention)
            print(f"  FLOPs/token [{convention}]: {fb.per_token / 1e9:.3f} G (core {fb.core_params:,} params, "
                  f"other {fb.other_params:,}, attention {fb.attention / 1e9:.3f} G)")
        if meta:
            continue
        ids = torch.randint(0, cfg.vocab_size, (4, min(64, cfg.block_size)))
        depths = DepthSampler.from_config(cfg)(step=1, batch_size=4) if cfg.looped else None
        out = model(ids, ids, depths=depths, telemetry=cfg.looped)
        out.loss.backward()
        print(f"  loss {out.loss.item():.4f} (ln V = {torch.tensor(float(cfg.padded_vocab_size)).log():.4f})")
        for key, value in (out.telemetry or {}).items():
            print(f"  {key}: {[round(v, 4) for v in value.tolist()] if value.dim() else round(value.item(), 4)}")


if __name__ == "__main__":
    from parcae.command_line import run_main

    run_main("model", inspect_presets)
