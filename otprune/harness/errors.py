"""The errors the harness reports to its user instead of a traceback."""


class ConfigError(ValueError):
    """A config (or command line) that cannot run; raised before any run starts."""


class MissingResource(ConfigError):
    """A file of the project that this otprune installation lacks."""
