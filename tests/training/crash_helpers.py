"""Callbacks that really kill the training process (used through trainer.callbacks in subprocess runs)."""

import os
import signal

import lightning as L
import torch


class KillDuringSave(L.Callback):
    """From optimizer step ``at_step`` on, the next checkpoint write stops halfway and the process is SIGKILLed."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step < self.at_step:
            return
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            import io
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_save


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
