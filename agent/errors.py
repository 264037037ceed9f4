"""Errors of the device agent. Each says what went wrong and what to do next (``hint``).

    EdgeLLMError (edgellm.errors)
    └── AgentError
        ├── NotProvisionedError   the data dir has no config: run `edgellm-agent provision`
        ├── SlotIntegrityError    an installed slot's files do not match what was verified
        ├── InstallError          an update/installation could not complete (old slot kept)
        │   ├── UpdateRefused         policy refused it (downgrade, rejected version, other model)
        │   │   └── AlreadyCurrent        that version is already serving (not a failure)
        │   └── HealthCheckFailed     the new model failed its health check
        └── NoRollbackTarget      rollback asked but there is no previous slot
"""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class AgentError(EdgeLLMError):
    """Base of every agent error."""


def split_error(e: BaseException) -> tuple[str, str | None]:
    """(message, hint) of an error, without the hint folded into the message."""
    if isinstance(e, EdgeLLMError):
        return (str(e.args[0]) if e.args else type(e).__name__), e.hint
    return f"{type(e).__name__}: {e}" if not str(e) else str(e), None


class NotProvisionedError(AgentError):
    pass


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
