"""Errors that reach the user as one actionable line (no traceback): what is wrong, where, what to do."""


def one_line(text) -> str:
    """`text` with each unprintable character escaped ('\\n'), so that a message quoting user input
    (a path or a value with a newline in it) stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class CskdError(Exception):
    """Base class: the command-line entry points print `error: <message>` and exit with status 2.
    The message is always one line, whatever user input it quotes."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(CskdError):
    pass


class DataError(CskdError):
    pass


class RunDirError(CskdError):
    pass


class NonFiniteLossError(CskdError):
    pass
