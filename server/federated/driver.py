"""Moves federated runs along, one step per :meth:`FlDriver.tick`, on the running server's loop.

* **pending → inviting**: the plan (the base version's bundles in the repository, the one to merge
  into, the artifact each profile runs); the group's devices that are online, have a GGUF base for
  their profile and stay under ``--max-epsilon`` (ledger + this run's rounds) get an ``fl_invite``
  command over MQTT; the others are recorded as excluded with the reason. Fewer eligible than
  ``--min-devices``: failed, nothing sent.
* **inviting → running**: the devices' replies (``{"accepted", "reason"}``) are read from the store
  as ingest writes them; when all have answered or the invite timeout passes, at least
  ``--min-devices`` acceptances submit the run to the SuperLink (``flwr run``), else it fails.
* **running**: the ServerApp writes rounds and the result; the driver watches the Flower run and
  a deadline, and turns a device's ``fl_state`` failure event into a recorded reason.
* **aggregated → publishing → published**: :func:`server.federated.publish.close_loop` in a worker
  thread (a build takes minutes; rollouts keep being driven meanwhile).

When a run leaves ``running`` the invited devices get ``fl_stop``.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm import telemetry as wire
from server.federated import privacy
from server.federated.publish import BaseTarget, base_targets, merge_base, precision_rank
from server.federated.store import FlStore
from server.federated.superlink import SuperLink
from server.store import Store

logger = logging.getLogger(__name__)

MAX_REASON = 200


def parse_invite_reply(body: Any) -> tuple[bool, str]:
    """An agent's reply to ``fl_invite`` -> (accepted, reason). Anything malformed is a decline."""
    if not isinstance(body, dict):
        return False, "malformed reply"
    if body.get("ok") is not True:
        err = body.get("error")
        return False, f"agent error: {str(err)[:MAX_REASON]}" if err else "agent refused the command"
    res = body.get("result")
    if not isinstance(res, dict) or not isinstance(res.get("accepted"), bool):
        return False, "malformed reply (no 'accepted')"
    reason = res.get("reason", "")
    return res["accepted"], (reason if isinstance(reason, str) else "")[:MAX_REASON]


class FlDriver:
    """``publish(topic, payload, retain)`` is the server's MQTT connection."""

    def __init__(
        self,
        store: Store,
        data_root: Path,
        publish: Callable[[str, bytes, bool], None],
        superlink: SuperLink | None,
        *,
        advertise: str | None = None,
        poll_s: float = 15.0,
    ) -> None:
        self.store = store
        self.fl = FlStore(store)
        self.root = Path(data_root)
        self.publish = publish
        self.superlink = superlink
        self.advertise = advertise or (_advertised(superlink.address) if superlink else "")
        self.poll_s = poll_s
        self._watching: dict[str, float] = {}  # running run -> next Flower status poll
        self._workers: dict[str, threading.Thread] = {}

    def tick(self) -> None:
        if self.superlink is not None:
            self.superlink.supervise()
        for rid in [r for r in self._watching if self.fl.run(r)["state"] != "running"]:
            self._watching.pop(rid)
            self._send_all(rid, "fl_stop", {"run_id": rid})
        for r in self.fl.runs(("pending", "inviting", "running", "aggregated", "publishing")):
            try:
                getattr(self, f"_step_{r['state']}")(r)
            except Exception as e:
                logger.exception("federated run %s: step failed", r["id"])
                self.fl.fail(r["id"], f"{type(e).__name__}: {_one_line(e)}")

    # -- commands

    def _command(self, device: str, name: str, args: dict[str, Any]) -> str:
        cid = f"{name}-{secrets.token_hex(6)}"
        self.publish(wire.command_topic(device), json.dumps({"id": cid, "name": name, "args": args}).encode(), False)
        return cid

    def _send_all(self, run_id: str, name: str, args: dict[str, Any]) -> None:
        for d in self.fl.devices(run_id):
            if d["status"] in ("accepted", "trained", "lost", "rejected", "invited"):
                try:
                    self._command(d["device"], name, args)
                except Exception:
                    logger.exception("sending %s to %s failed", name, d["device"])

    # -- steps

    def _step_pending(self, r: dict[str, Any]) -> None:
        if self.superlink is None or not self.superlink.ready():
            return  # a server started with --fl picks it up once its SuperLink answers
        rid, s = r["id"], r["settings"]
        targets = base_targets(self.root / "repo", r["model"], r["base_version"])
        if not targets:
            self.fl.fail(rid, f"the repository has no bundle of {r['model']} {r['base_version']}")
            return
        merge = merge_base(targets)
        by_profile = {p: t for t in targets for p in t.profiles}
        planned = [float(s.dp_noise)] * s.rounds
        candidates = []
        for d in self.store.devices(group=r["grp"]):
            dev, t = d["id"], by_profile.get(d["profile"] or "")
            if not d["online"]:
                self.fl.set_device(rid, dev, "excluded", "offline")
            elif t is None:
                self.fl.set_device(rid, dev, "excluded", f"no bundle of the base for profile {d['profile']!r}")
            elif t.runtime != "gguf":
                self.fl.set_device(rid, dev, "excluded", "runtime-onnx")
            elif s.max_epsilon is not None and privacy.would_exceed(
                self.fl.noise_multipliers(dev), planned, s.max_epsilon, s.delta
            ):
                spent = self.fl.epsilon(dev, s.delta)
                self.fl.set_device(
                    rid,
                    dev,
                    "excluded",
                    f"privacy budget: ε spent {spent:.3g}, this run would pass --max-epsilon {s.max_epsilon:g}",
                )
            else:
                candidates.append((dev, t))
        train = _training_target([t for _, t in candidates]) if candidates else merge
        eligible = []
        for dev, t in candidates:
            if t.artifact_sha256 == train.artifact_sha256:
                eligible.append(dev)
            else:
                self.fl.set_device(
                    rid,
                    dev,
                    "excluded",
                    f"base-mismatch: runs {t.quantization} "
                    f"{t.artifact_sha256[:12]}, this run trains on {train.quantization} "
                    f"{train.artifact_sha256[:12]}",
                )
        plan = {
            "merge_target": merge.name,
            "train_target": train.name,
            "train_bundle": str(train.path),
            "base_sha256": train.artifact_sha256,
            "superlink": self.advertise,
        }
        if len(eligible) < s.min_devices:
            self.fl.fail(
                rid,
                f"{len(eligible)} eligible device(s) in group {r['grp']}, the run needs "
                f"{s.min_devices} (see each device's reason)",
            )
            return
        for dev in eligible:
            cid = self._command(
                dev,
                "fl_invite",
                {
                    "run_id": rid,
                    "superlink": self.advertise,
                    "base_version": r["base_version"],
                    "base_sha256": train.artifact_sha256,
                },
            )
            self.fl.set_device(rid, dev, "invited", command=cid)
        self.fl.set_state(rid, "inviting", f"invited {len(eligible)} device(s)", plan=plan)

    def _replies(self, run: dict[str, Any]) -> dict[str, Any]:
        invited = {d["command"]: d["device"] for d in self.fl.devices(run["id"]) if d["status"] == "invited"}
        out: dict[str, Any] = {}
        if not invited:
            return out
        devs = sorted(set(invited.values()))
        rows = self.store.db.execute(
            f"SELECT device, body FROM messages WHERE kind='reply' AND received>=? AND device IN "
            f"({','.join('?' * len(devs))})",
            (run["created"], *devs),
        )
        for dev, body in rows:
            try:
                b = json.loads(body)
            except ValueError:
                continue
            if isinstance(b, dict) and invited.get(b.get("id")) == dev:
                out[dev] = b
        return out

    def _step_inviting(self, r: dict[str, Any]) -> None:
        rid, s = r["id"], r["settings"]
        for dev, body in self._replies(r).items():
            yes, reason = parse_invite_reply(body)
            self.fl.set_device(rid, dev, "accepted" if yes else "declined", reason)
        waiting = [d for d in self.fl.devices(rid) if d["status"] == "invited"]
        if waiting and time.time() - r["phase_started"] < s.invite_timeout_s:
            return
        for d in waiting:
            self.fl.set_device(rid, d["device"], "lost", f"no answer to the invitation in {s.invite_timeout_s:.0f}s")
        accepted = [d for d in self.fl.devices(rid) if d["status"] == "accepted"]
        if len(accepted) < s.min_devices:
            self._send_all(rid, "fl_stop", {"run_id": rid})
            self.fl.fail(rid, f"{len(accepted)} device(s) accepted, the run needs {s.min_devices}")
            return
        assert self.superlink is not None
        self.fl.set_state(rid, "running", f"{len(accepted)} device(s) accepted; submitting to the SuperLink")
        flower_run = self.superlink.submit({"edgellm-run-id": rid, "edgellm-store": str(self.store.path)})
        self.fl.db.execute("UPDATE fl_runs SET flower_run=? WHERE id=?", (flower_run, rid))
        self.fl.log(rid, "running", f"Flower run {flower_run} started")
        self._watching[rid] = time.monotonic() + self.poll_s

    def _step_running(self, r: dict[str, Any]) -> None:
        rid, s = r["id"], r["settings"]
        self._watching.setdefault(rid, time.monotonic() + self.poll_s)
        for d in self.fl.devices(rid):
            for e in self.store.events(device=d["device"], name="fl_state", since=r["phase_started"]):
                f = e["fields"]
                if f.get("run_id") == rid and f.get("state") == "failed" and d["status"] in ("accepted", "trained"):
                    self.fl.set_device(rid, d["device"], "lost", f"device: {str(f.get('reason', ''))[:MAX_REASON]}")
        deadline = r["phase_started"] + s.invite_timeout_s + 2 * s.rounds * s.round_timeout_s + 300
        if time.time() > deadline:
            self._abort(r, "the run passed its deadline (rounds × round timeout)")
            return
        if time.monotonic() < self._watching[rid] or not r["flower_run"] or self.superlink is None:
            return
        self._watching[rid] = time.monotonic() + self.poll_s
        status = self.superlink.run_status(r["flower_run"])
        if status and status.startswith("finished") and self.fl.run(rid)["state"] == "running":
            self.fl.fail(
                rid, f"the Flower run ended ({status}) without a result; see {self.superlink.home / 'superlink.log'}"
            )

    def _abort(self, r: dict[str, Any], reason: str) -> None:
        if r["flower_run"] and self.superlink is not None:
            try:
                self.superlink.stop_run(r["flower_run"])
            except Exception:
                logger.exception("stopping Flower run %s failed", r["flower_run"])
        self.fl.fail(r["id"], reason)

    def _step_aggregated(self, r: dict[str, Any]) -> None:
        self.fl.set_state(r["id"], "publishing", f"merging, building and publishing {r['model']} {r['version']}")
        self._start_worker(r["id"])

    def _step_publishing(self, r: dict[str, Any]) -> None:
        t = self._workers.get(r["id"])
        if t is None or not t.is_alive():
            if r["id"] not in self._workers:  # a restarted server resumes the publication
                self._start_worker(r["id"])

    def _start_worker(self, rid: str) -> None:
        t = threading.Thread(target=self._publish, args=(rid,), name=f"fl-publish-{rid}", daemon=True)
        self._workers[rid] = t
        t.start()

    def _publish(self, rid: str) -> None:
        from server.federated.publish import close_loop

        fl = FlStore(self.store.reopen())  # this thread's own connection
        try:
            done = close_loop(fl, self.root, self.root / "keys", self.root / "repo", rid)
        except Exception as e:
            logger.exception("federated run %s: publishing failed", rid)
            fl.fail(rid, f"publishing failed: {_one_line(e) or type(e).__name__}")
            return
        run = fl.run(rid)
        msg = f"published {run['model']} {run['version']} ({', '.join(done['targets'])})"
        if done["rollout"]:
            msg += f"; canary rollout {done['rollout']} started"
        fl.set_state(rid, "published", msg, rollout=done["rollout"], result={**(run["result"] or {}), **done})


def _one_line(e: BaseException, limit: int = 600) -> str:
    return " ".join(str(e).split())[:limit]


def _training_target(targets: list[BaseTarget]) -> BaseTarget:
    """The artifact most eligible devices run (ties: higher precision). One run trains on one
    artifact: the train message names the one sha256 a device must be running."""
    count: dict[str, int] = {}
    for t in targets:
        count[t.artifact_sha256] = count.get(t.artifact_sha256, 0) + 1
    return min(targets, key=lambda t: (-count[t.artifact_sha256], precision_rank(t.quantization), t.name))


def _advertised(address: str) -> str:
    """The SuperLink address devices are told: a wildcard bind is advertised by host name."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"
