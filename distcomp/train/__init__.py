"""The main job, ``distcomp train CONFIG``: config -> model + data -> loop -> telemetry.

from distcomp.train import load_train_config
from distcomp.train.launch import launch
sys.exit(launch(load_train_config("configs/quickstart.yaml", ["steps=50"]), resume=None))
"""

from distcomp.train.config import TrainConfig, config_from_raw, config_to_raw, load_train_config

__all__ = ["TrainConfig", "config_from_raw", "config_to_raw", "load_train_config"]
