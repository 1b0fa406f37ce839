"""The one error type of the server's plain logic: a refusal with the gRPC status that should answer it."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the server refuses; `code` is a grpc.StatusCode name, the message names the problem."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
