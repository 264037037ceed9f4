"""One real command line per `edgellm-server` command, shown as the "Example:" section of its `--help`."""

from __future__ import annotations

D = "--data-dir /srv/edgellm-server"
EXAMPLES = {
    "audit": f"edgellm-server audit {D} --limit 50",
    "ca init": f"edgellm-server ca init {D}",
    "ca issue-device": f"edgellm-server ca issue-device {D} arm-07 --out certs/arm-07",
    "ca issue-server": f"edgellm-server ca issue-server {D} --host fleet.example --out certs/server",
    "ca issue-server-client": f"edgellm-server ca issue-server-client {D} --name fleet-1",
    "ca mosquitto-conf": f"edgellm-server ca mosquitto-conf {D} --port 8883 > /etc/mosquitto/conf.d/edgellm.conf",
    "device command": f"edgellm-server device command {D} arm-07 ping --wait 10",
    "device group": f"edgellm-server device group {D} arm-07 canary",
    "device logs": f"edgellm-server device logs {D} arm-07 --timeout 30",
    "device ping": f"edgellm-server device ping {D} arm-07",
    "device retry": f"edgellm-server device retry {D} arm-07",
    "device status": f"edgellm-server device status {D} arm-07 --format json",
    "device update": f"edgellm-server device update {D} arm-07",
    "devices": f"edgellm-server devices {D} --group canary",
    "fl start": (
        f"edgellm-server fl start {D} --model assistant --version 1.0.0 \\\n"
        "    --publish 1.1.0 --rounds 3 --min-devices 2"
    ),
    "fl status": f"edgellm-server fl status {D} --wait",
    "init": "edgellm-server init --data-dir /srv/edgellm-server --keys keys/",
    "publish": f"edgellm-server publish {D} dist/assistant-1.0.0.bundle",
    "rollout abort": f"edgellm-server rollout abort {D} r-1",
    "rollout pause": f"edgellm-server rollout pause {D} r-1",
    "rollout resume": f"edgellm-server rollout resume {D} r-1",
    "rollout rollback": f"edgellm-server rollout rollback {D} r-1",
    "rollout start": (
        f"edgellm-server rollout start {D} --model assistant --version 1.0.0 --canary 10%\n"
        f"edgellm-server rollout start {D} --model assistant --version 1.1.0 --adapter federated \\\n"
        "    --gate 'error_rate<=0.01' --stages 50%,100%"
    ),
    "rollout status": f"edgellm-server rollout status {D} r-1",
    "run": f"edgellm-server run {D} --mqtt mqtts://broker.example:8883 --http 0.0.0.0:8443",
    "token create": f"edgellm-server token create {D} --role operator --name ci",
    "token list": f"edgellm-server token list {D}",
    "token revoke": f"edgellm-server token revoke {D} t-1",
    "yank": f"edgellm-server yank {D} --model assistant --version 1.0.0 --reason 'bad answers'",
}
