"""Data preparation CLI: `python tools/prep.py stage=ingest|tokenizer|tokenize|shuffle|shard|stats out_dir=DATA ...`."""

import sys
from pathlib import Path

import hydra

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recdepth.errors import RecdepthError  # noqa: E402
from recdepth.prep import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="prep")
def main(cfg) -> None:
    try:
        run(cfg)
    except RecdepthError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
