"""Errors of the device agent. Each says what went wrong and what to do next (``hint``).

    EdgeLLMError (edgellm.errors)
    └── AgentError
        ├── NotProvisionedError   the data dir has no config: run `edgellm-agent provision`
        ├── SlotIntegrityError    an installed slot's files do not match what was verified
        ├── InstallError          an update/installation could not complete (old slot kept)
        │   ├── UpdateRefused         policy refused it (downgrade, rejected version, same version)
        │   └── HealthCheckFailed     the new model failed its health check
        └── NoRollbackTarget      rollback asked but there is no previous slot
"""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class AgentError(EdgeLLMError):
    """Base of every agent error."""


class NotProvisionedError(AgentError):
    pass


class SlotIntegrityError(AgentError):
    pass


class InstallError(AgentError):
    pass


class UpdateRefused(InstallError):
    pass


class HealthCheckFailed(InstallError):
    def __init__(self, message: str, *, hint: str | None = None, report: dict | None = None) -> None:
        super().__init__(message, hint=hint)
        self.report = report or {}


class NoRollbackTarget(AgentError):
    pass
