"""Exceptions that name the file and what is wrong with it."""


class FsaeError(Exception):
    """Base class: a message a user can act on."""


class DataError(FsaeError):
    """A data file is missing, unreadable or inconsistent."""


class CheckpointError(FsaeError):
    """A checkpoint does not fit the model or config it is loaded into."""


class ConfigError(FsaeError):
    """A config file or override is wrong."""
