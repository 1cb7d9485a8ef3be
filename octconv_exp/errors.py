"""Errors a user can cause, as opposed to programming errors.

A :class:`UserError` ends the process with one clear line and a non-zero exit
(see ``octconv_exp.cli.preflight``); anything else is a bug and keeps its traceback.
"""

#: Exit status for a bad override, missing data or an unusable device.
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Something the user can fix: a bad override, a missing file, corrupt data."""


class ConfigError(UserError):
    """A config value outside what the schema accepts.

    The message always names the offending key, the value given and what is accepted.
    """

    def __init__(self, key, value, expected):
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"{key}={value!s}: {expected}")


class Diverged(UserError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch, step, loss):
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(f"training diverged: loss {loss} at epoch {epoch}, step {step}; "
                         "lower optimizer.lr or change the optimizer")


class RunInterrupted(UserError):
    """SIGINT/SIGTERM stopped the run; a checkpoint was written. ``exit_code`` is 128 + signal."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = int(exit_code)
