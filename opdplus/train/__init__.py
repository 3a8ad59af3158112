"""Training: config, the loop, checkpoints, metrics. ``train(cfg)`` runs a whole distillation."""

from opdplus.train.config import ConfigError, TrainConfig, load_config, with_overrides
from opdplus.train.loop import TrainResult, train
from opdplus.train.run_dir import RunDirError

__all__ = ["ConfigError", "RunDirError", "TrainConfig", "TrainResult", "load_config", "train", "with_overrides"]
