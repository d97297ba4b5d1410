"""Collaborative-learning protocols: each a client and a server-side state machine, wired to gRPC in services/."""


class ProtocolError(Exception):
    """A request the protocol refuses; `code` names the gRPC status the service answers with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
