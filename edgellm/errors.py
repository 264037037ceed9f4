"""Errors of the edgellm SDK.

Every error carries a message that says what went wrong and, where possible, a ``hint``
saying what to do next; the CLI prints both.

    EdgeLLMError
    ├── ProfileError          a hardware profile is missing or invalid
    ├── BundleError           a bundle archive or manifest is malformed or hostile
    │   └── BundleIntegrityError   a file's hash or size does not match the manifest
    ├── TrustError            keys, signing, repository metadata
    │   └── VerificationError      a bundle or metadata failed TUF verification
    └── BuildError            (edgellm.pipeline) training, export, quantization failures
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every edgellm error. ``hint`` says what to do next."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class ProfileError(EdgeLLMError):
    """A hardware profile is missing or invalid."""


class BundleError(EdgeLLMError):
    """A bundle archive or its manifest is malformed, hostile or over a limit."""


class BundleIntegrityError(BundleError):
    """A file inside a bundle does not match the manifest's hash or size."""


class TrustError(EdgeLLMError):
    """Keys, signing or repository metadata problems."""


class VerificationError(TrustError):
    """TUF verification refused a bundle or its metadata."""


class BuildError(EdgeLLMError):
    """The build pipeline failed (bad model dir, data, export, quantization)."""
