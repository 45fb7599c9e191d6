"""The exceptions the client raises for its user."""


class ClientError(Exception):
    """A failure the user should read (no traceback)."""


class Refused(ClientError):
    """The node refused a request: `code` is its error code (e.g. not_a_member)."""

    def __init__(self, message: str, code: str | None):
        super().__init__(f"{message} ({code})")
        self.code = code
