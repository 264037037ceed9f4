"""A paho MQTT client that reads through a buffer and acknowledges a batch in one write.

paho 2.x reads every packet with at least three ``recv`` calls (1 byte of command, 1-4 bytes of
length, then the rest) and queues every PUBACK as its own packet, each waking the network thread
through its socket pair. At thousands of messages per second those system calls and wake-ups are
most of the ingest's CPU (measured: docs/speed.md). :class:`FastClient` changes only that:

* the socket is wrapped in :class:`BufferedSocket` (one ``recv`` of up to 64 KiB feeds many
  packets; ``pending()`` tells paho's loop that bytes are waiting, as it already does for TLS);
* :meth:`FastClient.ack_many` queues the PUBACKs of a whole batch as one write;
* QoS 1 PUBLISH packets are decoded by :func:`parse_publish_v5` (topic, packet id, payload;
  properties skipped, the server uses none) and handed to ``on_publish_fast`` without paho's
  MQTTMessage, property objects and topic matching; anything unusual goes to paho's parser.

These use paho internals (``_create_socket``, ``_handle_publish``, ``_in_packet``, ``_packet_queue``, ``_sock``); paho is pinned below 3
and the ingest falls back to plain ``ack`` when ``ack_many`` is missing.
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 64 * 1024
PUBACK = 0x40


class BufferedSocket:
    """Wraps a (TLS) socket: ``recv(n)`` is served from a buffer filled by large reads."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._sock.recv(READ_SIZE)  # BlockingIOError / SSLWantReadError pass to paho
            if len(data) <= n:
                return data
            self._data, self._pos = data, 0
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def buffered(self) -> int:
        return len(self._data) - self._pos

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return self.buffered() + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:  # fileno, send, close, setblocking, ...
        return getattr(self._sock, name)


def parse_publish_v5(packet: bytes | bytearray) -> tuple[int, str, bytes] | None:
    """(packet id, topic, payload) of an MQTT 5 QoS 1 PUBLISH body (variable header + payload), or
    None when anything is out of bounds or unusual (empty topic / topic alias, bad UTF-8): the
    caller then hands the packet to paho's own parser."""
    n = len(packet)
    if n < 2:
        return None
    pos = 2 + ((packet[0] << 8) | packet[1])
    if pos == 2 or pos + 3 > n:
        return None
    try:
        topic = packet[2:pos].decode("utf-8")
    except UnicodeDecodeError:
        return None
    mid = (packet[pos] << 8) | packet[pos + 1]
    pos += 2
    plen, mult = 0, 1
    for _ in range(4):  # property length: a variable byte integer of at most 4 bytes
        if pos >= n:
            return None
        b = packet[pos]
        pos += 1
        plen += (b & 127) * mult
        mult *= 128
        if not b & 128:
            break
    else:
        return None
    pos += plen
    if pos > n or mid == 0:
        return None
    return mid, topic, bytes(packet[pos:])


class FastClient(mqtt.Client):
    #: called in the network thread with (packet id, topic, payload) for every QoS 1 PUBLISH
    #: instead of ``on_message`` (MQTT 5, manual acknowledgements); None: paho's own path
    on_publish_fast: Any = None

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        fast = self.on_publish_fast
        cmd = self._in_packet["command"]
        if fast is None or (cmd & 0x06) >> 1 != 1 or self._protocol != mqtt.MQTTv5 or not self._manual_ack:
            return super()._handle_publish()
        parsed = parse_publish_v5(self._in_packet["packet"])
        if parsed is None:
            return super()._handle_publish()
        fast(*parsed)
        return mqtt.MQTT_ERR_SUCCESS

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """Handle every packet already buffered, not one per trip through ``select``."""
        rc = super().loop_read(max_packets)
        sock = self._sock
        while (
            rc == mqtt.MQTT_ERR_SUCCESS and isinstance(sock, BufferedSocket) and sock.buffered() and self._sock is sock
        ):
            rc = super().loop_read(max_packets)
        return rc

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK (QoS 1, success) every message id in ``mids`` with one queued write."""
        if mids:
            packet = b"".join(struct.pack("!BBH", PUBACK, 2, mid) for mid in mids)
            self._packet_queue(PUBACK, packet, 0, 0)
