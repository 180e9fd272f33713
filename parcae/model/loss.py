"""The one scoring rule of evaluation: the negative log-likelihood of each target token under a distribution over
the *real* vocabulary.

The embedding (and so the logits) has ``padded_vocab_size`` rows, ``vocab_size`` rounded up to a multiple of
``padding_multiple`` (64 in the paper) for matmul efficiency. Rows past ``vocab_size`` are never tokens, but their
logits are finite (random at initialisation), so a softmax over all rows gives them probability mass and raises
every loss. Every evaluation — ``parcae test``/``validate`` (training's ``_evaluate``), ``parcae perplexity``,
``parcae core``, ``parcae lm-eval`` and the engine's ``score`` — scores with :func:`token_nll`, so they report the
same number for the same tokens whatever the padding.

The training loss (``LoopedLM.forward(labels=...)``) is the official cross-entropy over all padded rows; see
docs/design.md ("Loss over the padded vocabulary") for why training keeps it.

    from parcae.model.loss import token_nll
    nats = token_nll(model(x, loops=8).logits, y, model.config.vocab_size)      # [B, S] nats per target
    total = token_nll(logits, y, vocab_size, reduction="sum")
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label value excluded from the loss


def real_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """fp32 logits of the real vocabulary only (the padding rows dropped)."""
    return logits[..., :vocab_size].float()


def token_nll(logits: Tensor, targets: Tensor, vocab_size: int, reduction: str = "none") -> Tensor:
    """NLL (nats) of ``targets`` [...] under ``logits`` [..., V ≥ vocab_size] restricted to the real vocabulary.

    Targets equal to :data:`IGNORE_INDEX` count 0 (and are left out of ``"mean"``). ``reduction``: ``"none"``
    (the shape of ``targets``), ``"sum"`` or ``"mean"``."""
    real = real_logits(logits, vocab_size)
    nll = F.cross_entropy(real.reshape(-1, vocab_size), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX,
                          reduction=reduction)
    return nll.reshape(targets.shape) if reduction == "none" else nll
