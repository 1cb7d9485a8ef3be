"""``python -m octconv_exp.report``: (re)write a sweep's report from its run dirs.

The documented command stays at the top of the package; the code is
:mod:`octconv_exp.reports.report`."""
import sys

from .reports.report import main

if __name__ == "__main__":
    sys.exit(main())
