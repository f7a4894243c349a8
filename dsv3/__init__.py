"""dsv3: DeepSeek-V3 end to end: model, training, FP8, HF checkpoints, inference engine, server, evaluation."""

from .checkpoint import CheckpointError, convert, load_model, save_model
from .config import ConfigError, ModelConfig
from .model import Transformer, build_model, cast_model

__all__ = ["ModelConfig", "ConfigError", "Transformer", "build_model", "cast_model", "load_model", "save_model",
           "convert", "CheckpointError"]
