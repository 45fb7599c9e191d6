"""The one exception the client raises for its user."""


class ClientError(Exception):
    """A failure the user should read (no traceback)."""
