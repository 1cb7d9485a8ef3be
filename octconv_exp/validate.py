"""``python -m octconv_exp.validate``: compose and validate every config combination before a sweep.

The documented command stays at the top of the package; the code is
:mod:`octconv_exp.cli.validate`."""
import sys

from .cli.validate import main

if __name__ == "__main__":
    sys.exit(main())
