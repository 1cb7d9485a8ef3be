"""octconv-exp entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

Composes the config (conf/), hands it to the runner and returns the test accuracy, so that
optimising sweepers can use it.
"""
import sys

import hydra

from octconv_exp import config  # noqa: F401  (registers the schema in the ConfigStore)
from octconv_exp.cli import preflight, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    return run_task(cfg)


if __name__ == "__main__":
    sys.argv[1:] = preflight(sys.argv[1:])
    main()
