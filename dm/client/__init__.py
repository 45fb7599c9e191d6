"""The client: connection and handshake, sending, receiving, peers' keys, paying, and the terminal."""
