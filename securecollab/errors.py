"""Refusals: a request the protocol refuses, with the gRPC status the service answers it with."""


class ProtocolError(Exception):
    """A request the protocol refuses; `code` names the gRPC status the service answers with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class TooFewClients(ProtocolError):
    """A round with fewer complete (or accepted) clients than the minimum: aborted, training goes on."""

    def __init__(self, message: str):
        super().__init__("FAILED_PRECONDITION", message)
