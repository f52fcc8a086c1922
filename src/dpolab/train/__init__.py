"""Training: ``dpolab.train.run(config)`` is the Python form of ``dpolab train CONFIG.yaml``."""

from dpolab.train.config import TrainConfig, load_config
from dpolab.train.loop import run

__all__ = ["TrainConfig", "load_config", "run"]
