"""TLS contexts for the federation (standard library :mod:`ssl`).

    server = Server(..., ssl_context=server_context("server.crt", "server.key"))
    client = Client(..., ssl_context=client_context("ca.crt"))

The server presents its certificate chain; clients verify it against a CA file
(for a self-signed certificate: the certificate itself) and check the host
name. Byte accounting counts the TLS records (ciphertext), see
:mod:`fedpress.federation.transport`.
"""

from __future__ import annotations

import os
import ssl
from typing import Optional, Union

__all__ = ["server_context", "client_context"]

PathLike = Union[str, "os.PathLike[str]"]


def server_context(certfile: PathLike, keyfile: Optional[PathLike] = None,
                   password: Optional[str] = None) -> ssl.SSLContext:
    """A server-side context with the certificate chain and key, TLS 1.2+."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.fspath(certfile), None if keyfile is None else os.fspath(keyfile), password)
    return context


def client_context(cafile: Optional[PathLike] = None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side context trusting ``cafile`` (None: the system's CAs), TLS 1.2+."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=None if cafile is None else os.fspath(cafile))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    return context
