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


# Environment failures that are the user's to fix (full disk, read-only or wrong path): one line
# naming the path, like bad input, rather than a traceback.
_USER_ERRNOS = {"ENOSPC", "EROFS", "EEXIST", "EACCES", "EPERM", "ENOTDIR", "EISDIR", "EDQUOT", "ENOENT"}


def os_error_line(exc: OSError) -> str | None:
    """The one line naming the path for an environment failure that is the user's to fix, or None."""
    import errno

    if errno.errorcode.get(exc.errno or 0) not in _USER_ERRNOS:
        return None
    path = exc.filename if exc.filename is not None else "?"
    return f"{path}: {exc.strerror}" + (f" (-> {exc.filename2})" if exc.filename2 else "")
