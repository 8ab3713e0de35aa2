"""Train a depth-recurrent language model: `python run.py [group=option ...] [key=value ...]`."""

import hydra
from omegaconf import DictConfig

import recdepth.config  # noqa: F401  (registers the schemas and resolvers Hydra composes against)
from recdepth.train.run import main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def run(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    run()
