"""Keys, signed repositories and verification, built on python-tuf.

* :mod:`edgellm.trust.keys` — Ed25519 role keys, the expiry policy, the version-1 root.
* :mod:`edgellm.trust.repository` — the writer: publish bundles as TUF targets whose
  ``custom`` field carries the ML facts, under a lock, all or nothing.
* :mod:`edgellm.trust.client` — the device side: ngclient with a pinned root and bounded downloads.
* :mod:`edgellm.trust.envelope` — signed bundles, verified offline exactly like an update.

Errors (from :mod:`edgellm.errors`, plus :class:`FetchError` from the client)::

    EdgeLLMError
    ├── BundleError              (edgellm.bundle, edgellm._archive) a malformed or hostile archive
    └── TrustError               keys, signing, repository metadata
        ├── VerificationError    signed metadata or a file refused (the other side's fault)
        └── FetchError           bytes could not be fetched (the network's fault)
"""

from __future__ import annotations

from edgellm.trust.client import (
    MAX_METADATA_BYTES,
    ClientConfig,
    FetchError,
    TufClient,
    VerifiedTarget,
    verify_bundle_file,
)
from edgellm.trust.envelope import ENVELOPE_FORMAT, ENVELOPE_NAME, is_signed_bundle, verify_signed_bundle
from edgellm.trust.keys import ROLES, ExpiryPolicy, KeyStore, copy_online_keys, init_keys, parse_duration
from edgellm.trust.repository import Repository, TargetSummary, canonical_safe, target_custom

__all__ = [
    "ENVELOPE_FORMAT",
    "ENVELOPE_NAME",
    "MAX_METADATA_BYTES",
    "ROLES",
    "ClientConfig",
    "ExpiryPolicy",
    "FetchError",
    "KeyStore",
    "Repository",
    "TargetSummary",
    "TufClient",
    "VerifiedTarget",
    "canonical_safe",
    "copy_online_keys",
    "init_keys",
    "is_signed_bundle",
    "parse_duration",
    "target_custom",
    "verify_bundle_file",
    "verify_signed_bundle",
]
