"""Errors of the control plane. Every one carries a ``hint`` (what to do next), as every
:class:`~edgellm.errors.EdgeLLMError` does; callers branch on the class and its fields, never on
the message text.

    EdgeLLMError                      (edgellm.errors)
    └── ServerError                   the data directory, its settings or keys are wrong
        ├── NotFoundError             no such rollout, device or token (HTTP 404)
        ├── ConflictError             busy: another replica is writing the same thing (HTTP 409)
        ├── AuthError                 (server.auth) no usable token (401) or too low a role (403)
        ├── RolloutError              a rollout request is invalid or cannot be carried out
        │   └── RolloutNotFound       (also a NotFoundError)
        ├── IdentityError             fleet CA or certificate problems (reserved names included)
        └── IngestError               one telemetry message is refused; ``reason`` names the check
                                      (oversized, json, schema, topic, unstorable) and is the
                                      ``malformed_<reason>`` counter it adds to
"""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class ServerError(EdgeLLMError):
    """The server's data directory, settings or keys are wrong."""


class NotFoundError(ServerError):
    """The named rollout, device or token does not exist."""


class ConflictError(ServerError):
    """Another writer holds what this call needs (e.g. the repository); try again shortly."""


class RolloutError(ServerError):
    """A rollout request is invalid or cannot be carried out."""


class RolloutNotFound(RolloutError, NotFoundError):
    """No rollout of that id."""


class IdentityError(ServerError):
    """CA or certificate problems."""


class IngestError(ServerError):
    """A telemetry message the server will not store. ``reason`` is one of :data:`REASONS`."""

    REASONS = ("oversized", "json", "schema", "topic", "unstorable")

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown ingest refusal reason {reason!r}")
        super().__init__(message, hint=hint)
        self.reason = reason

    @property
    def counter(self) -> str:
        return f"malformed_{self.reason}"
