"""The wire protocol, sans-IO: frames, message shapes, order rules, error codes.

docs/PROTOCOL.md is the source of truth and describes every message.
"""
from .errors import ERRORS, ProtocolError, error  # noqa: F401
from .frames import HEADER, FrameDecoder, MessageDecoder, Oversized, encode, frame, parse  # noqa: F401
from .limits import MAX_BOOK_LEAVES, MAX_CONTAINERS, MAX_FRAME, MAX_MSG_ID, MAX_OTHER_FRAME, MAX_VISIBLE, SEND_TYPE_PREFIX  # noqa: F401
from .messages import (  # noqa: F401
    CLIENT_MESSAGES,
    MAX_REQUEST_ID,
    NODE_MESSAGES,
    PHASES,
    auth_payload,
    bounty_key,
    check_bounty,
    check_client_message,
    check_envelope,
    check_fields,
    is_channel,
    is_hex32,
    request_id,
)
