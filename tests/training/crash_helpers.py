"""Callbacks that really kill the training process (used through trainer.callbacks in subprocess runs)."""

import os
import signal

import lightning as L
import torch


def _half_save_then_sigkill(real_save, only=None):
    """A ``torch.save`` that writes half of the file and SIGKILLs the process (for files whose name contains
    ``only``; others are saved normally)."""

    def half_save(obj, f, *args, **kwargs):
        if only is not None and only not in str(getattr(f, "name", f)):
            return real_save(obj, f, *args, **kwargs)
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    half_save.kills = True
    return half_save


class KillDuringSave(L.Callback):
    """From optimizer step ``at_step`` on, the next checkpoint write stops halfway and the process is SIGKILLed."""

    only = None  # which staging files the kill hits (None: any)

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at_step and not getattr(torch.save, "kills", False):
            torch.save = _half_save_then_sigkill(torch.save, self.only)


class PoisonWeights(L.Callback):
    """Sets one weight to NaN at optimizer step ``at_step``, so every later loss is NaN."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.net.final_norm.weight[0] = float("nan")


class KillAtStep(L.Callback):
    """SIGKILLs this process when optimizer step ``at_step`` is about to start (every rank does the same)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringLastSave(KillDuringSave):
    """From optimizer step ``at_step`` on, the next write of ``last.ckpt``'s staging file stops halfway and the
    process is SIGKILLed; the step checkpoint written just before it is complete."""

    only = ".last.ckpt.tmp-"
