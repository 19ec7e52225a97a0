"""TLS contexts for the federation (standard library ``ssl``).

    server = Server(..., ssl_context=server_context("server.crt", "server.key"))
    client = Client(..., ssl_context=client_context("ca.crt"))

The server presents its certificate chain; clients verify it against a CA file
(for a self-signed certificate: the certificate itself) and check the host
name. Byte accounting counts the TLS records (ciphertext), see
``fedpress.federation.transport``.

For a test deployment, ``self_signed_certificate`` (``fedpress certificate``)
makes a self-signed pair (ECDSA P-256) for the names and addresses the clients
use; the clients pass the certificate itself as their CA file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from typing import Optional, Sequence, Union

__all__ = ["server_context", "client_context", "self_signed_certificate"]

PathLike = Union[str, "os.PathLike[str]"]


def server_context(
    certfile: PathLike, keyfile: Optional[PathLike] = None, password: Optional[str] = None
) -> ssl.SSLContext:
    """A server-side context with the certificate chain and key, TLS 1.2+."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.fspath(certfile), None if keyfile is None else os.fspath(keyfile), password)
    return context


def client_context(cafile: Optional[PathLike] = None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side context trusting ``cafile`` (None: the system's CAs), TLS 1.2+."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if cafile is None else os.fspath(cafile))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    return context


def self_signed_certificate(
    cert_path: PathLike,
    key_path: PathLike,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 30,
    *,
    overwrite: bool = False,
) -> None:
    """Writes a self-signed certificate (``cert_path``) and its private key
    (``key_path``, mode 0600) valid for ``hosts`` (DNS names or IP addresses) for
    ``days`` days. Existing files are kept (FileExistsError) unless ``overwrite``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("name at least one host the clients connect to (a DNS name or an IP address)")
    if not 1 <= int(days) <= 3650:
        raise ValueError(f"days must be in 1..3650, got {days}")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host):
                raise ValueError(f"not a host name or IP address: {host!r}") from None
            names.append(x509.DNSName(host))
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0])[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(private.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(ski, False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for path in (cert_path, key_path):
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{os.fspath(path)} exists")
    _write(key_path, key_pem, 0o600, overwrite)
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644, overwrite)


def _write(path: PathLike, data: bytes, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(os.fspath(path), flags, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(os.fspath(path), mode)  # an existing file keeps its old mode through O_TRUNC
