"""Errors of the device agent. Each says what went wrong (the message) and what to do next
(``hint``, a field: callers read ``e.message`` and ``e.hint``, never parse ``str(e)``).

    EdgeLLMError (edgellm.errors)
    ├── AgentAPIError (edgellm.client)   the local API answered with an error (client side)
    │   └── AgentUnreachable                 no agent answers at the address (client side)
    └── AgentError
        ├── NotProvisionedError   the data dir has no config: run `edgellm-agent provision`
        ├── ConfigError           a setting or an argument is invalid (device id, listen address, ...)
        ├── LockTimeout           another process holds the install lock
        ├── SlotIntegrityError    an installed slot's files do not match what was verified
        ├── InstallError          an update/installation could not complete (old slot kept)
        │   ├── UpdateRefused         policy refused it (downgrade, rejected version, other model)
        │   │   └── AlreadyCurrent        that version is already serving (not a failure)
        │   └── HealthCheckFailed     the new model failed its health check
        ├── NoRollbackTarget      rollback asked but there is no previous slot
        ├── QueueFull             the inference queue is full (the API answers 429)
        └── ApiProblem            a request to the local API is refused (status, code, param)
"""

from __future__ import annotations

from typing import Any

from edgellm.errors import EdgeLLMError


class AgentError(EdgeLLMError):
    """Base of every agent error."""


def message_of(e: BaseException) -> str:
    """The message of any error, without its hint."""
    if isinstance(e, EdgeLLMError):
        return e.message
    return str(e) or type(e).__name__


def hint_of(e: BaseException) -> str | None:
    return e.hint if isinstance(e, EdgeLLMError) else None


class NotProvisionedError(AgentError):
    pass


class ConfigError(AgentError):
    """A setting, a config file field or a command-line argument is invalid."""


class LockTimeout(AgentError):
    """Another process holds the install lock."""


class SlotIntegrityError(AgentError):
    pass


class InstallError(AgentError):
    pass


class UpdateRefused(InstallError):
    pass


class AlreadyCurrent(UpdateRefused):
    """The version asked for is the one already serving (nothing to do)."""


class HealthCheckFailed(InstallError):
    def __init__(self, message: str, *, hint: str | None = None, report: dict | None = None) -> None:
        super().__init__(message, hint=hint)
        self.report = report or {}


class NoRollbackTarget(AgentError):
    pass


class QueueFull(AgentError):
    def __init__(self, retry_after: int) -> None:
        super().__init__("request queue is full", hint=f"retry after {retry_after} s")
        self.retry_after = retry_after


class ApiProblem(AgentError):
    """A refused API request, answered OpenAI-shaped: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status, self.code, self.kind, self.param = status, code, kind, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
