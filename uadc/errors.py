"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UadcError(Exception):
    """A problem caused by user input (recipe, data, paths, options) rather than a bug."""

    exit_code = 2
