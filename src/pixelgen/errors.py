"""One exception type for every user-facing failure: the CLI prints its message on one line and exits non-zero."""


class PixelgenError(Exception):
    """A problem the user can fix; `str(err)` names the thing and the fix. `exit_code` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(PixelgenError):
    """A bad config file, key or value (exit code 2, like an argparse usage error)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)
