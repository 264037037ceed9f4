"""Privacy accounting for the per-device ledger.

Each round a device's update is averaged under central DP, it spends one Gaussian mechanism
with its own noise multiplier z_i (see :mod:`server.federated.strategy`). A device's ε at the
run's δ is the Rényi-DP composition of every such release it ever took part in, across runs,
computed by Flower's RDP accountant (Google's ``dp-accounting`` behind it: ``flwr[dp]``) with no
sampling amplification (every invited device takes part in every round, so none is claimed) and
the add-or-remove-one-device neighbouring relation (device-level privacy).

A run without noise releases unprotected updates: those rounds are recorded with ε = ∞.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from edgellm.errors import EdgeLLMError

DEFAULT_DELTA = 1e-5


class PrivacyError(EdgeLLMError):
    """Privacy accounting is unavailable or was asked something impossible."""


def _accountant(delta: float) -> object:
    try:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    except ImportError as e:  # dp-accounting missing
        raise PrivacyError(
            f"RDP accounting is unavailable ({e})",
            hint="install the server extra: pip install 'edgellm[server]' (flwr[dp])",
        ) from e
    cfg = PrivacyConfig(
        target_delta=delta,
        population_size=1,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    try:
        return RdpAccountant(cfg)
    except ImportError as e:
        raise PrivacyError(
            f"RDP accounting is unavailable ({e})",
            hint="install the server extra: pip install 'edgellm[server]' (flwr[dp])",
        ) from e


def epsilon(noise_multipliers: Iterable[float], delta: float = DEFAULT_DELTA) -> float:
    """ε at ``delta`` after one Gaussian release per noise multiplier (0 or less: no noise, ε = ∞)."""
    zs = [float(z) for z in noise_multipliers]
    if not zs:
        return 0.0
    if any(not math.isfinite(z) or z <= 0 for z in zs):
        return math.inf
    from flwr.serverapp import GaussianPrivacyEvent

    acc = _accountant(delta)
    for z in zs:
        acc.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=1, population_size=1))  # type: ignore[attr-defined]  # dp_accounting ships no type stubs
    return float(acc.get_privacy_spent().epsilon)  # type: ignore[attr-defined]  # no stubs either


def would_exceed(
    spent_multipliers: Iterable[float], planned: Iterable[float], max_epsilon: float, delta: float = DEFAULT_DELTA
) -> bool:
    """Whether the releases already spent plus the ``planned`` ones pass ``max_epsilon``."""
    return epsilon([*spent_multipliers, *planned], delta) > max_epsilon
