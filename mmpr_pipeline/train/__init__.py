"""The bundled MPO trainer: `mpo_loss`, the data collation, and one readable training loop.

    from mmpr_pipeline.train import MPOConfig, train
    train(MPOConfig(model="build/models/demo", data="runs/demo", output_dir="runs/demo/mpo"))

or `mmpr train data_cards/train_mpo.yaml --set learning_rate=1e-5`.
"""

from mmpr_pipeline.train.cli import cli_train
from mmpr_pipeline.train.config import ConfigError, MPOConfig
from mmpr_pipeline.train.config import load as load_config
from mmpr_pipeline.train.loop import train
from mmpr_pipeline.train.loss import RunningMean, mpo_loss
from mmpr_pipeline.train.step import NonFiniteLossError

__all__ = [
    "ConfigError",
    "MPOConfig",
    "NonFiniteLossError",
    "RunningMean",
    "cli_train",
    "load_config",
    "mpo_loss",
    "train",
]
