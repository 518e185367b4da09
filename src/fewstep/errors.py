"""User-facing errors. The CLI prints ``error: <message>`` on one line and exits with code 2."""


class FewstepError(Exception):
    """A mistake the user can fix (bad data, bad config, missing teacher, ...).

    The message names the problem and what to do, in one line.
    """


class DataError(FewstepError):
    """Bad or unreadable data."""


class ConfigError(FewstepError):
    """Unknown key, wrong type or impossible value in a configuration."""


class ModelError(FewstepError):
    """Missing, incomplete, unsafe or mismatched model directory."""
