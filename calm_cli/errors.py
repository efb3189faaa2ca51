"""Exceptions the CLI turns into one-line messages and exit codes."""


class CalmError(Exception):
    """A runtime failure the user can act on (bad file, mismatched checkpoint): exit code 1."""

    exit_code = 1


class UsageError(CalmError):
    """The command line asked for something impossible (bad flag value, missing path): exit code 2."""

    exit_code = 2
