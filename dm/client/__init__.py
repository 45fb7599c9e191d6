"""The client, one module per concern:

core        ChatClient, composing the parts below, and its Events
connection  the socket, the handshake, the reader, writes, the pinger, requests matched by id
peers       peers' public keys, pinned on first use
sending     one send path: pay, seal, frame, track until answered
outbox      unacknowledged messages on disk, resent after a reconnect or when their peer comes
receiving   verify, decrypt, check the channel label, return the code
payment     how a sender pays: single bounties or prepaid books
errors      ClientError, the failure a user reads
terminal    the terminal around ChatClient
"""
