"""Federated learning over TCP (optionally TLS) with fedpress payloads and exact
bytes-on-wire accounting.

    from fedpress.federation import Server, Client

    server = Server("0.0.0.0", 8080, initial_params, rounds=20, clients_per_round=8,
                    codec="topk:0.01+q4+zstd", token=token, out_dir="run",
                    ssl_context=server_context("cert.pem", "key.pem"))
    Client("server:8080", token=token, train_fn=train_fn,
           ssl_context=client_context("cert.pem")).run_sync()

TLS is the default: without an ``ssl_context`` both refuse to start unless
``insecure=True`` (plain TCP, for loopback and trusted networks; every frame
after the handshake is still authenticated). ``.tls.self_signed_certificate``
(``fedpress certificate``) makes a pair for a test deployment.

Modules: ``.protocol`` (frames, handshake), ``.transport`` (counting
below TLS), ``.accounting`` (per-round, per-client rows), ``.model``
(update / downlink arithmetic, checkpoints), ``.server``, ``.client``,
``.tls`` (SSL contexts). This package is not imported by ``import fedpress``.
"""

from __future__ import annotations

from .client import Client, parse_address
from .protocol import (
    FEATURES,
    PROTOCOL_VERSION,
    AuthenticationError,
    ConnectionClosed,
    ErrorCode,
    FederationError,
    FrameTooLarge,
    FrameType,
    PeerError,
    ProtocolError,
)
from .server import RunExistsError, Server, WaitTimeout
from .tls import client_context, server_context

__all__ = [
    "Server",
    "RunExistsError",
    "WaitTimeout",
    "Client",
    "parse_address",
    "server_context",
    "client_context",
    "PROTOCOL_VERSION",
    "FEATURES",
    "FrameType",
    "ErrorCode",
    "FederationError",
    "ProtocolError",
    "FrameTooLarge",
    "PeerError",
    "AuthenticationError",
    "ConnectionClosed",
]
