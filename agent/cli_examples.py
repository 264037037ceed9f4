"""One real command line per `edgellm-agent` command, shown as the "Example:" section of its `--help`."""

from __future__ import annotations

EXAMPLES = {
    "install": "edgellm-agent install --data-dir /var/lib/edgellm-agent usb/assistant-1.0.0.bundle",
    "learn status": "edgellm-agent learn status --data-dir /var/lib/edgellm-agent",
    "learn wipe": "edgellm-agent learn wipe --data-dir /var/lib/edgellm-agent",
    "provision": (
        "edgellm-agent provision --data-dir /var/lib/edgellm-agent --device-id arm-07 --profile rpi5-8gb \\\n"
        "    --root root.json --server https://fleet.example:8443 --mqtt mqtts://broker.example:8883"
    ),
    "rollback": "edgellm-agent rollback --data-dir /var/lib/edgellm-agent",
    "run": "edgellm-agent run --data-dir /var/lib/edgellm-agent --listen 127.0.0.1:8080",
    "status": "edgellm-agent status --data-dir /var/lib/edgellm-agent --format json",
    "update": "edgellm-agent update --data-dir /var/lib/edgellm-agent --model assistant --version 1.1.0",
}
