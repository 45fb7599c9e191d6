"""The exceptions the client raises for its user."""


class ClientError(Exception):
    """A failure the user should read (no traceback)."""


class NotConnected(ClientError):
    """The node cannot be asked right now (it is away, or the connection just dropped); what
    the client keeps on disk may stand in (a pinned key), and sends wait in the outbox."""


class Refused(ClientError):
    """The node refused a request: `code` is its error code (e.g. not_a_member)."""

    def __init__(self, message: str, code: str | None):
        super().__init__(f"{message} ({code})")
        self.code = code
