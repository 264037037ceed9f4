"""Shared pytest configuration.

Fixtures live in one module per area so work on one area never edits another's file:
    fixtures_trust   keys, signed repositories, bundles (SDK core)
    fixtures_build   tiny trained models and ONNX exports (build pipeline I)
    fixtures_gguf    GGUF exports and bundles (build pipeline II)
    fixtures_mqtt    a real Mosquitto broker (control plane)
    fixtures_adapters  LoRA adapters and their signed adapter bundles
"""

import os

# Keep native runtimes from busy-waiting on the shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = [
    "fixtures_trust",
    "fixtures_build",
    "fixtures_gguf",
    "fixtures_mqtt",
    "fixtures_agent",
    "fixtures_adapters",
    "fixtures_pg",  # the `store` fixture (SQLite and PostgreSQL); pg_server starts only when asked for
]
