"""One exception type for every mistake a user can make.

The CLI prints a UserError as a single line (``hpc-lensiam: error: ...``) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a flag, a config key, a file. The message names it and what was expected."""


class ConfigError(UserError):
    """A config file or value that fails validation."""


# Exit code of a rank that stopped because another rank failed or stopped answering (a collective
# broke). It has printed at most one line; the launcher (hpc_lensiam/launch.py) names the rank that
# failed, not this one.
PEER_EXIT_CODE = 3


class PeerFailure(Exception):
    """Another rank failed or stopped answering, so this one stops too. The CLI prints ``str(exc)`` as
    one line unless ``quiet`` (the rank that failed says what went wrong) and exits with
    :data:`PEER_EXIT_CODE`."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet
