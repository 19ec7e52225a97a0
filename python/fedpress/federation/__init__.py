"""Federated learning over TCP (optionally TLS) with fedpress payloads and exact
bytes-on-wire accounting.

    from fedpress.federation import Server, Client

    server = Server("0.0.0.0", 8080, initial_params, rounds=20, clients_per_round=8,
                    codec="topk:0.01+q4+zstd", token=token, out_dir="run")
    Client("server:8080", token=token, train_fn=train_fn).run_sync()

Modules: :mod:`.protocol` (frames, handshake), :mod:`.transport` (counting
below TLS), :mod:`.accounting` (per-round, per-client rows), :mod:`.model`
(update / downlink arithmetic, checkpoints), :mod:`.server`, :mod:`.client`,
:mod:`.tls` (SSL contexts). This package is not imported by ``import fedpress``.
"""

from __future__ import annotations

from .client import Client, parse_address
from .protocol import (FEATURES, PROTOCOL_VERSION, AuthenticationError, ConnectionClosed, ErrorCode,
                       FederationError, FrameTooLarge, FrameType, PeerError, ProtocolError)
from .server import Server
from .tls import client_context, server_context

__all__ = ["Server", "Client", "parse_address", "server_context", "client_context", "PROTOCOL_VERSION",
           "FEATURES", "FrameType", "ErrorCode", "FederationError", "ProtocolError", "FrameTooLarge",
           "PeerError", "AuthenticationError", "ConnectionClosed"]
