"""One exception type for every mistake a user can make.

The CLI prints a UserError as a single line (``hpc-lensiam: error: ...``) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a flag, a config key, a file. The message names it and what was expected."""


class ConfigError(UserError):
    """A config file or value that fails validation."""
