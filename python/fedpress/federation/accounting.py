"""Server-side traffic accounting: one row per round, per client, per direction.

Every byte a server socket reads or writes lands in exactly one row: the row
that is current when the byte is counted (the setup row, round 0, before the
first round starts; then one row per round; the shutdown after the last round
goes into the last row). A connection's bytes are held while its handshake
runs; when it is admitted they are credited to its client, when it is
rejected (bad token, wrong version, garbage, oversized frame, timeout) to the
row's rejected bucket, together with everything it exchanges afterwards.
So the sum over all rows is the traffic the server's sockets saw, byte for byte.

"uplink" is client -> server (what the server reads), "downlink" server -> client.
Wire bytes are everything on the socket (framing, handshakes, TLS records);
payload bytes are the fedpress payloads inside TASK and UPDATE frames.
"""

from __future__ import annotations

import time
from typing import Any, Optional

__all__ = ["ClientTraffic", "TrafficRow", "Ledger", "ConnectionAccount"]


class ClientTraffic:
    """One client's bytes in one row."""

    __slots__ = (
        "uplink_wire_bytes",
        "downlink_wire_bytes",
        "uplink_payload_bytes",
        "downlink_payload_bytes",
        "connections",
    )

    def __init__(self) -> None:
        self.uplink_wire_bytes = 0
        self.downlink_wire_bytes = 0
        self.uplink_payload_bytes = 0
        self.downlink_payload_bytes = 0
        self.connections = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class TrafficRow:
    """The traffic of one round (or of the setup before the first round)."""

    def __init__(self, round: int, phase: str) -> None:
        self.round = round
        self.phase = phase
        self.started = time.monotonic()
        self.clients: dict[str, ClientTraffic] = {}
        self.rejected_connections = 0
        self.rejected_uplink_wire_bytes = 0
        self.rejected_downlink_wire_bytes = 0

    def client(self, client_id: str) -> ClientTraffic:
        entry = self.clients.get(client_id)
        if entry is None:
            entry = self.clients[client_id] = ClientTraffic()
        return entry

    def totals(self) -> dict[str, Any]:
        """The row's byte fields, per-client breakdown included."""
        out: dict[str, Any] = {
            name: sum(getattr(c, name) for c in self.clients.values())
            for name in ("uplink_payload_bytes", "uplink_wire_bytes", "downlink_payload_bytes", "downlink_wire_bytes")
        }
        out["rejected_connections"] = self.rejected_connections
        out["rejected_uplink_wire_bytes"] = self.rejected_uplink_wire_bytes
        out["rejected_downlink_wire_bytes"] = self.rejected_downlink_wire_bytes
        out["rejected_wire_bytes"] = self.rejected_uplink_wire_bytes + self.rejected_downlink_wire_bytes
        out["client_bytes"] = {cid: c.as_dict() for cid, c in sorted(self.clients.items())}
        return out


class Ledger:
    """Holds the current row; connections report into it through accounts."""

    def __init__(self) -> None:
        self.row = TrafficRow(0, "setup")

    def start_row(self, round: int, phase: str = "train") -> TrafficRow:
        """Closes the current row (the caller keeps it) and opens a new one."""
        self.row = TrafficRow(round, phase)
        return self.row

    def account(self) -> ConnectionAccount:
        return ConnectionAccount(self)


class ConnectionAccount:
    """Routes one server connection's byte counts into the ledger's current row.

    Call it as the counting transport's sink: ``account("rx" | "tx", n)``.
    """

    __slots__ = ("ledger", "state", "client_id", "_held_rx", "_held_tx")

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.state = "pending"
        self.client_id: Optional[str] = None
        self._held_rx = 0
        self._held_tx = 0

    def __call__(self, direction: str, n: int) -> None:
        row = self.ledger.row
        if self.state == "admitted":
            c = row.client(self.client_id)  # type: ignore[arg-type]
            if direction == "rx":
                c.uplink_wire_bytes += n
            else:
                c.downlink_wire_bytes += n
        elif self.state == "rejected":
            if direction == "rx":
                row.rejected_uplink_wire_bytes += n
            else:
                row.rejected_downlink_wire_bytes += n
        elif direction == "rx":
            self._held_rx += n
        else:
            self._held_tx += n

    def admit(self, client_id: str) -> None:
        """The handshake passed: the held bytes and all later ones are the client's."""
        if self.state != "pending":
            return
        self.state = "admitted"
        self.client_id = client_id
        c = self.ledger.row.client(client_id)
        c.connections += 1
        c.uplink_wire_bytes += self._held_rx
        c.downlink_wire_bytes += self._held_tx
        self._held_rx = self._held_tx = 0

    def reject(self) -> None:
        """The connection never passed the handshake (counted once)."""
        if self.state != "pending":
            return
        self.state = "rejected"
        row = self.ledger.row
        row.rejected_connections += 1
        row.rejected_uplink_wire_bytes += self._held_rx
        row.rejected_downlink_wire_bytes += self._held_tx
        self._held_rx = self._held_tx = 0

    def payload(self, direction: str, n: int) -> None:
        """Payload bytes inside a TASK ("tx") or UPDATE ("rx") frame of an admitted client."""
        if self.state != "admitted":
            return
        c = self.ledger.row.client(self.client_id)  # type: ignore[arg-type]
        if direction == "rx":
            c.uplink_payload_bytes += n
        else:
            c.downlink_payload_bytes += n
