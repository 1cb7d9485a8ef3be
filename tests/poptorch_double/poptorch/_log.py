"""What reached the double (not part of PopTorch): ``LOG``, written as JSON at exit to the file
named by ``POPTORCH_DOUBLE_LOG``; PopTorch-style warnings."""
import atexit
import json
import logging
import os

LOG = {"options": [], "dataloaders": [], "executors": [], "multiconv": [], "events": []}

# The IPUs the executors of this process hold (the fixture of tests/test_ipu.py resets it).
IPUS_IN_USE = [0]

# _logging.py:16: PopTorch logs on "poptorch::python"; POPTORCH_LOG_LEVEL (default WARN), 78.
logger = logging.getLogger("poptorch::python")


def warn(msg):
    LOG["events"].append("warning: " + msg)
    logger.warning(msg)


def _write_log():
    path = os.environ.get("POPTORCH_DOUBLE_LOG")
    if path:
        with open(path, "w") as f:
            json.dump(LOG, f, indent=1, default=str)


atexit.register(_write_log)
