"""Errors of the edgellm SDK.

Every error carries a message that says what went wrong and, where possible, a ``hint``
saying what to do next. The two are separate fields: ``str(e)`` is the message alone, ``e.hint``
the next step; :meth:`EdgeLLMError.describe` joins them for people (the CLI prints that).
Callers branch on the class, never on the text.

    EdgeLLMError
    ├── ProfileError           a hardware profile is missing or invalid
    ├── BundleError            a bundle archive or manifest is malformed or hostile
    │   └── BundleIntegrityError   a file's hash or size does not match the manifest
    ├── TrustError             keys, signing, repository metadata
    │   └── VerificationError      a bundle or metadata failed TUF verification
    ├── BuildError             (edgellm.pipeline) training, export, quantization failures
    └── RuntimeFailure         (edgellm.runtime) a model that cannot load or generate
        ├── ModelLoadError         the artifact is missing, malformed or not what the manifest says
        └── GenerationError        a request could not be served
            └── PromptTooLongError     prompt + max_tokens exceed the context

Other parts extend the tree from their own modules (``TelemetryError`` in
:mod:`edgellm.telemetry`, ``FetchError`` under ``TrustError``, the agent's and server's errors).
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every edgellm error: ``message`` (also ``str(e)``) and ``hint`` (what to do next)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def describe(self) -> str:
        """The message and, on its own line, the hint: what a person should read."""
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


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


class RuntimeFailure(EdgeLLMError):
    """Base of every runtime failure (a model that cannot load or generate)."""


class ModelLoadError(RuntimeFailure):
    """The artifact could not be loaded: missing, malformed, or not what the manifest says."""


class GenerationError(RuntimeFailure):
    """A request could not be served (e.g. the prompt does not fit in the context)."""


class PromptTooLongError(GenerationError):
    """The prompt (plus max_tokens) exceeds the model context."""
