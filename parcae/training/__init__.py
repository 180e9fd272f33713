"""parcae.training: the LightningModule, optimizers, schedules and training callbacks."""

from .module import LoopedLMModule, NonFiniteLossError, parse_loops
from .optim import LRSchedule, Muon, MuonAdamW, OptimizerConfig, ScheduleConfig, build_optimizer, split_parameters

__all__ = ["LRSchedule", "LoopedLMModule", "Muon", "MuonAdamW", "NonFiniteLossError", "OptimizerConfig",
           "ScheduleConfig", "build_optimizer", "parse_loops", "split_parameters"]
