"""``python -m octconv_exp.compare RUN_OR_SWEEP_DIR ...``: runs side by side (the command's
code is in :mod:`octconv_exp.reports.compare`)."""
import sys

from .reports.compare import main

if __name__ == "__main__":
    sys.exit(main())
