"""User-facing errors: the CLI prints these as one line and exits with code 2."""

import contextlib
import sys


class UadcError(Exception):
    """A problem caused by user input (recipe, data, paths, options) rather than a bug."""

    exit_code = 2


@contextlib.contextmanager
def exit_on_user_error(interrupted: str = "interrupted; no artifact was written for the unfinished step"):
    """For command entry points: a UadcError becomes one ``error: ...`` line and its exit code."""
    try:
        yield
    except UadcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
