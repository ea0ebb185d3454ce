"""Errors that reach the user as one actionable line (no traceback): what is wrong, where, what to do."""


class CskdError(Exception):
    """Base class: the command-line entry points print `error: <message>` and exit with status 2."""


class ConfigError(CskdError):
    pass


class DataError(CskdError):
    pass


class RunDirError(CskdError):
    pass


class NonFiniteLossError(CskdError):
    pass
