"""Secure aggregation of integer codes modulo 2^m: the server learns the sum of the
surviving clients' vectors and nothing about any one of them.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning") in its honest-but-curious form, with the sparse
neighbourhood graph of SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead") for large rounds. Each client u sends::

    y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)   (mod 2^m)

The pairwise masks cancel in the sum of the clients that survive; the server removes
the rest with a correction vector built from Shamir shares that the surviving clients
reveal: the self-mask seed b_u of every client whose vector arrived, the mask key of
every neighbour that dropped after sharing keys, never both for one client.

This module is the protocol's logic and its messages as bytes, nothing else: the
federation carries the messages, and another component adds the masked vectors up::

    params = SecAggParams(client_ids=[1, 2, 3], modulus_bits=12, length=n, seed=round_seed)
    client = SecAggClient(params, 1)                        # one per client and round
    server = SecAggServer(params)                           # one per round
    server.receive_advertise(1, client.advertise())         # stage 1, every client
    ... server.keys_for(1) -> client.share_keys(...) -> server.receive_shares(1, ...)   # stage 2
    ... server.shares_for(1) -> client.report(...) -> server.receive_report(1, ...)      # stage 3: reports,
    ... server.verdict() -> client.exclude(...); y = client.mask(codes); server.receive_masked(1)
    ... server.unmask_request() -> client.unmask(...) -> server.receive_unmask(1, ...)   # stage 4
    plain_sum = (sum_of_masked - server.correction()) & (2**m - 1)

``secure_sum`` runs the whole protocol in one process (simulations, a Flower app).
docs/secure-aggregation.md specifies the messages, the derivations and the parameter
rules, so that an independent implementation can interoperate.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import itertools
import math
import operator
import os
import struct
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "SecAggError",
    "SecAggParams",
    "SecAggClient",
    "SecAggServer",
    "MessageType",
    "secure_sum",
    "VERSION",
    "MAGIC",
    "FIELD_PRIME",
    "DEFAULT_DROPOUT_TOLERANCE",
    "RECONSTRUCTION_FAILURE_BITS",
    "MAX_CLIENTS",
    "MAX_LENGTH",
    "SURVIVED",
    "DROPPED",
]

#: The message layout version this module writes and the only one it reads.
VERSION = 1
#: The first two bytes of every message.
MAGIC = b"SA"
#: Shamir shares live in GF(p) for the smallest prime above 2^256, so a 32-byte
#: secret is one field element and a share is 33 bytes (2^521 - 1 would double them).
FIELD_PRIME = 2**256 + 297
#: The fraction of a round's clients that may drop when neither a threshold nor a
#: tolerance is given.
DEFAULT_DROPOUT_TOLERANCE = 0.3
#: The threshold rule keeps the chance that a sparse graph leaves some client with too
#: few surviving neighbours below 2^-40 (dropouts independent of the graph).
RECONSTRUCTION_FAILURE_BITS = 40
#: Limits of a round: client ids are u32 on the wire, and no count read from a message
#: allocates more than this many entries.
MAX_CLIENTS = 1 << 20
#: The longest vector: the ChaCha20 block counter (32 bits of 64-byte blocks) covers
#: 2^32 coordinates of 8 bytes with room to spare.
MAX_LENGTH = 1 << 32
#: Bits of the unmask request's two-bit status per client: this client's masked vector
#: arrived (reveal shares of its self-mask seed) ...
SURVIVED = 0b01
#: ... or it shared keys and then dropped (reveal shares of its mask key).
DROPPED = 0b10

_KEY_BYTES = 32
_SHARE_BYTES = 33
_TAG_BYTES = 16
_CIPHERTEXT_BYTES = 2 * _SHARE_BYTES + _TAG_BYTES
_ROUND_TAG_BYTES = 8
_HEADER = struct.Struct("<2sBB8s")
_U32 = struct.Struct("<I")
_MAX_ID = (1 << 32) - 1
# Keystream is generated and added in pieces of this many bytes, so that a piece of
# the running sum and the keystream added to it stay in the L2 cache.
_CHUNK_BYTES = 1 << 18
_KEYS_PER_PASS = 4096
# How many share subsets reconstruction tries once leaving out one share at a time did
# not give the committed secret (each try is one Lagrange interpolation).
_MAX_SUBSETS = 256
# Domain separation: every hash, key derivation and AEAD input starts with its own label.
_LABEL_ROUND = b"fedpress secagg v1 round"
_LABEL_GRAPH = b"fedpress secagg v1 graph"
_LABEL_SHARE_KEY = b"fedpress secagg v1 share key"
_LABEL_SHARE_AD = b"fedpress secagg v1 share"
_LABEL_PAIR_MASK = b"fedpress secagg v1 pair mask"
_LABEL_SELF_MASK = b"fedpress secagg v1 self mask"
_LABEL_COMMITMENT = b"fedpress secagg v1 commitment"


class SecAggError(ValueError):
    """A secure aggregation message is malformed, out of order or inconsistent with
    the round, or the round cannot finish (too many dropouts, bad shares). The message
    names the field or the client and the numbers seen."""


class MessageType(enum.IntEnum):
    """The type byte of a message (offset 3)."""

    ADVERTISE = 1
    KEYS = 2
    SHARES = 3
    SHARES_FOR = 4
    UNMASK_REQUEST = 5
    UNMASK = 6
    REPORT = 7
    VERDICT = 8


_MESSAGE_NAMES = {
    MessageType.ADVERTISE: "advertise message",
    MessageType.KEYS: "keys message",
    MessageType.SHARES: "shares message",
    MessageType.SHARES_FOR: "shares-for message",
    MessageType.UNMASK_REQUEST: "unmask request",
    MessageType.UNMASK: "unmask message",
    MessageType.REPORT: "report message",
    MessageType.VERDICT: "verdict message",
}


# ---------------------------------------------------------------- parameters --


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}") from None


def _max_dropouts(n: int, tolerance: float) -> int:
    # round() first: 0.29 * 100 is 28.999999999999996, and 29 clients are meant.
    return math.floor(round(tolerance * n, 9))


@functools.lru_cache(maxsize=256)
def _threshold_rule(n: int, degree: int, dropouts: int) -> int:
    """The largest threshold t such that every client keeps t surviving neighbours when
    ``dropouts`` of the n clients drop: always for the complete graph, and for a sparse
    graph except with probability n * P[S < t] <= 2^-40, S hypergeometric (a client's
    degree neighbours are a uniform subset of the n - 1 others, ``dropouts`` of them
    gone in the worst case that the client itself stays)."""
    others = n - 1
    if degree >= others:
        return others - dropouts
    kept = others - dropouts
    total = math.comb(others, degree)
    limit = total  # n * 2^40 * sum_{s < t} C(kept, s) C(dropouts, degree - s) <= C(others, degree)
    tail = 0
    for s in range(degree + 1):
        tail += math.comb(kept, s) * math.comb(dropouts, degree - s)
        if (n * tail) << RECONSTRUCTION_FAILURE_BITS > limit:
            return s  # P[S < s] passes, P[S < s + 1] does not
    return degree


@functools.lru_cache(maxsize=256)
def _auto_degree(n: int, dropouts: int) -> int:
    """The neighbourhood degree when none is given: the smallest even k, at least
    2 * ceil(log2 n), whose threshold (``_threshold_rule``) is more than k / 2; the
    complete graph (n - 1) when that k would be more than half of n - 1, where a sparse
    graph saves less than half the work."""
    floor_degree = 2 * math.ceil(math.log2(n))
    for degree in range(max(2, floor_degree), (n - 1) // 2 + 1, 2):
        if 2 * _threshold_rule(n, degree, dropouts) > degree:
            return degree
    return n - 1


def _u32(value: int) -> bytes:
    return _U32.pack(value)


@dataclass(frozen=True)
class SecAggParams:
    """The public parameters of one secure aggregation round, which the server and
    every client must agree on (they enter every key derivation through ``digest``).

    ``client_ids``: the round's sampled clients, ascending, distinct, each in
    [0, 2^32 - 1]; at least 2. ``modulus_bits``: m in [2, 62], the codes are residues
    modulo 2^m. ``length``: L, the number of codes per client. ``seed``: 32 public bytes
    for this round (they place the clients in the graph; a server that may cheat must
    not choose them alone).

    ``threshold``: t, how many shares reconstruct a client's secret. Or
    ``dropout_tolerance``: the fraction of ``client_ids`` that may drop at any stage,
    from which t is derived (the default, 0.3, when neither is given): with D =
    floor(tolerance * n) dropouts, t is the largest number of surviving neighbours that
    every client keeps (complete graph: n - 1 - D; sparse graph: except with probability
    2^-40). Security needs t > degree / 2 (no two disjoint groups of t share holders,
    so a server cannot collect both secrets of one client); a tolerance that leaves
    less is refused. Both may be given: t must then be at most what the tolerance allows.

    ``degree``: k, how many neighbours each client has: n - 1 (the complete graph of
    Bonawitz et al.) or an even number below n - 1 (the SecAgg+ Harary graph over a
    permutation derived from ``seed``). When None, chosen from the tolerance: the
    smallest even k >= 2 ceil(log2 n) with a safe threshold, or the complete graph when
    that k exceeds (n - 1) / 2 (or when only a threshold is given).

    The derived ``threshold``, ``degree`` and ``dropout_tolerance`` are stored in place,
    so ``dataclasses.replace`` keeps them; build new params for another set of clients.
    """

    client_ids: Sequence[int]
    modulus_bits: int
    length: int
    seed: bytes
    threshold: Optional[int] = None
    dropout_tolerance: Optional[float] = None
    degree: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.client_ids, (str, bytes)) or not isinstance(self.client_ids, Iterable):
            raise ValueError(f"client_ids must be a sequence of integers, got {type(self.client_ids).__name__}")
        ids = tuple(_as_int(c, "each client id") for c in self.client_ids)
        if len(ids) < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {len(ids)}")
        if len(ids) > MAX_CLIENTS:
            raise ValueError(f"at most {MAX_CLIENTS} clients per round, got {len(ids)}")
        for position, cid in enumerate(ids):
            if not 0 <= cid <= _MAX_ID:
                raise ValueError(f"client id {cid} at position {position} is outside [0, 2^32 - 1]")
            if position and cid <= ids[position - 1]:
                what = "a duplicate" if cid == ids[position - 1] else f"after {ids[position - 1]}"
                raise ValueError(
                    f"client_ids must be sorted ascending without duplicates: {cid} at position {position} is {what}"
                )
        object.__setattr__(self, "client_ids", ids)
        m = _as_int(self.modulus_bits, "modulus_bits")
        if not 2 <= m <= 62:
            raise ValueError(f"modulus_bits must be in [2, 62], got {m}")
        object.__setattr__(self, "modulus_bits", m)
        length = _as_int(self.length, "length")
        if not 1 <= length <= MAX_LENGTH:
            raise ValueError(f"length must be in [1, 2^32], got {length}")
        object.__setattr__(self, "length", length)
        if not isinstance(self.seed, bytes) or len(self.seed) != 32:
            got = f"{len(self.seed)} bytes" if isinstance(self.seed, bytes) else type(self.seed).__name__
            raise ValueError(f"seed must be 32 bytes, got {got}")
        self._resolve_threshold(len(ids))

    def _resolve_threshold(self, n: int) -> None:
        tolerance = self.dropout_tolerance
        if tolerance is None and self.threshold is None:
            tolerance = DEFAULT_DROPOUT_TOLERANCE
        if tolerance is not None:
            if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
                raise ValueError(f"dropout_tolerance must be a number, got {type(tolerance).__name__}")
            tolerance = float(tolerance)
            if not 0.0 <= tolerance < 1.0:  # NaN fails too
                raise ValueError(f"dropout_tolerance must be in [0, 1), got {tolerance}")
        dropouts = None if tolerance is None else _max_dropouts(n, tolerance)
        if self.degree is None:
            degree = n - 1 if dropouts is None else _auto_degree(n, dropouts)
        else:
            degree = _as_int(self.degree, "degree")
            if degree != n - 1 and (degree < 2 or degree > n - 2 or degree % 2):
                raise ValueError(
                    f"degree must be {n - 1} (the complete graph of {n} clients) or an even number in "
                    f"[2, {n - 2}] (a Harary graph), got {degree}"
                )
        graph = "the complete graph" if degree == n - 1 else f"a degree-{degree} graph"
        allowed = None if dropouts is None else _threshold_rule(n, degree, dropouts)
        if self.threshold is None:
            assert allowed is not None and tolerance is not None
            if 2 * allowed <= degree:
                fix = "lower the tolerance" if degree == n - 1 else "lower the tolerance or raise the degree"
                raise ValueError(
                    f"dropout_tolerance {tolerance} is unsafe for {n} clients in {graph}: tolerating "
                    f"{dropouts} dropouts leaves a threshold of {max(allowed, 0)} shares, and security needs "
                    f"more than half of the {degree} neighbours ({degree // 2 + 1} or more); {fix}"
                )
            threshold = allowed
        else:
            threshold = _as_int(self.threshold, "threshold")
            if not degree // 2 + 1 <= threshold <= degree:
                raise ValueError(
                    f"threshold must be in [{degree // 2 + 1}, {degree}] for {graph} (more than half of the "
                    f"{degree} neighbours, so that a server cannot collect both secrets of a client), got {threshold}"
                )
            if allowed is not None and threshold > allowed:
                raise ValueError(
                    f"threshold {threshold} is more than the {allowed} shares that survive dropout_tolerance "
                    f"{tolerance} ({dropouts} of {n} clients) in {graph}"
                )
        object.__setattr__(self, "dropout_tolerance", tolerance)
        object.__setattr__(self, "degree", degree)
        object.__setattr__(self, "threshold", threshold)

    @property
    def n(self) -> int:
        """How many clients the round sampled."""
        return len(self.client_ids)

    @property
    def k(self) -> int:
        """The resolved neighbourhood degree (``degree`` as an int)."""
        assert self.degree is not None
        return self.degree

    @property
    def t(self) -> int:
        """The resolved threshold (``threshold`` as an int)."""
        assert self.threshold is not None
        return self.threshold

    @property
    def complete(self) -> bool:
        """Whether every client is every other client's neighbour."""
        return self.k == self.n - 1

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of every parameter: the HKDF salt of every key and the AEAD context,
        so that parties that disagree on any parameter agree on nothing."""
        h = hashlib.sha256(_LABEL_ROUND)
        h.update(self.seed)
        h.update(struct.pack("<BQIII", self.modulus_bits, self.length, self.t, self.k, self.n))
        h.update(np.asarray(self.client_ids, dtype="<u4").tobytes())
        return h.digest()

    @property
    def round_tag(self) -> bytes:
        """The first 8 bytes of ``digest``, written in every message's header."""
        return self.digest[:_ROUND_TAG_BYTES]

    @functools.cached_property
    def _positions(self) -> dict[int, int]:
        # A permutation anyone can recompute from the public seed: clients ordered by a
        # hash of the seed and their id. The Harary graph joins clients at cyclic
        # distance 1 .. k/2 in this order, so each client's neighbours are a uniform
        # k-subset of the others (what the threshold rule assumes).
        def key(cid: int) -> tuple[bytes, int]:
            return hashlib.sha256(_LABEL_GRAPH + self.seed + _u32(cid)).digest(), cid

        return {cid: position for position, cid in enumerate(sorted(self.client_ids, key=key))}

    @functools.cached_property
    def _order(self) -> tuple[int, ...]:
        return tuple(sorted(self._positions, key=self._positions.__getitem__))

    def neighbours(self, client_id: int) -> tuple[int, ...]:
        """The ids of ``client_id``'s neighbours, ascending."""
        self._check_member(client_id)
        if self.complete:
            return tuple(c for c in self.client_ids if c != client_id)
        p, n, order = self._positions[client_id], self.n, self._order
        half = self.k // 2
        return tuple(sorted(order[(p + d) % n] for d in itertools.chain(range(1, half + 1), range(-half, 0))))

    def are_neighbours(self, u: int, v: int) -> bool:
        """Whether clients u and v share pairwise masks."""
        self._check_member(u)
        self._check_member(v)
        if u == v:
            return False
        if self.complete:
            return True
        distance = (self._positions[u] - self._positions[v]) % self.n
        return min(distance, self.n - distance) <= self.k // 2

    def connected(self, members: Iterable[int]) -> bool:
        """Whether ``members`` form a connected subgraph. Unmasking a disconnected set
        of survivors would reveal the sum of each part on its own (the pairwise masks
        between parts are missing), so neither side of the protocol proceeds."""
        members = sorted({self._positions[c] for c in members})
        if self.complete or len(members) <= 1:
            return True
        # Two survivors adjacent in the cyclic order are neighbours when at most k/2
        # positions apart. One larger gap leaves a path around the cycle; two or more
        # split it, as no edge can jump a gap wider than k/2.
        half, n = self.k // 2, self.n
        gaps = sum((members[(i + 1) % len(members)] - p) % n > half for i, p in enumerate(members))
        return gaps <= 1

    def _check_member(self, client_id: int) -> None:
        if client_id not in self._member_set:
            raise SecAggError(f"client {client_id} is not in this round's client_ids")

    @functools.cached_property
    def _member_set(self) -> frozenset[int]:
        return frozenset(self.client_ids)

    def _neighbours_among(self, client_id: int, members: Collection[int]) -> list[int]:
        """``client_id``'s neighbours within ``members`` (a set or a dict, for fast
        membership), ascending: O(|members|) for the complete graph, O(k) otherwise."""
        if self.complete:
            return sorted(c for c in members if c != client_id)
        return [c for c in self.neighbours(client_id) if c in members]


# ------------------------------------------------------------ wire messages --


class _Reader:
    """Reads a message front to back; every shortfall is a SecAggError naming the field,
    the offset and the bytes left."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SecAggError(f"{what} must be bytes, got {type(data).__name__}")
        self.data = bytes(data)
        self.offset = 0
        self.what = what

    def take(self, size: int, field: str) -> bytes:
        have = len(self.data) - self.offset
        if have < size:
            raise SecAggError(
                f"{self.what} truncated: need {size} bytes for {field} at offset {self.offset}, have {have}"
            )
        out = self.data[self.offset : self.offset + size]
        self.offset += size
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])

    def finish(self) -> None:
        extra = len(self.data) - self.offset
        if extra:
            raise SecAggError(f"{self.what} has {extra} trailing bytes after offset {self.offset}")


def _header(params: SecAggParams, kind: MessageType) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, int(kind), params.round_tag)


def _open(params: SecAggParams, data: object, kind: MessageType) -> _Reader:
    """A reader past a checked header of a ``kind`` message of this round."""
    reader = _Reader(data, _MESSAGE_NAMES[kind])
    magic = reader.take(2, "the magic")
    if magic != MAGIC:
        raise SecAggError(f"{reader.what}: bad magic {magic!r}, expected {MAGIC!r}")
    version = reader.u8("the version")
    if version != VERSION:
        raise SecAggError(f"{reader.what}: unsupported version {version} (this implementation reads version {VERSION})")
    found = reader.u8("the message type")
    if found != kind:
        try:
            name = _MESSAGE_NAMES[MessageType(found)]
        except ValueError:
            name = "an unknown type"
        raise SecAggError(f"{reader.what}: message type {found} ({name}) where type {int(kind)} was expected")
    tag = reader.take(_ROUND_TAG_BYTES, "the round tag")
    if not hmac.compare_digest(tag, params.round_tag):
        raise SecAggError(
            f"{reader.what} belongs to another round or parameters: round tag {tag.hex()}, "
            f"expected {params.round_tag.hex()}"
        )
    return reader


def _read_count(reader: _Reader, params: SecAggParams, field: str) -> int:
    count = reader.u32(field)
    if count > params.n:
        raise SecAggError(f"{reader.what}: {field} {count} exceeds the {params.n} clients of the round")
    return count


def _read_id(reader: _Reader, params: SecAggParams, previous: int, field: str) -> int:
    """One client id of an ascending list, checked to be in the round."""
    cid = reader.u32(field)
    if cid <= previous:
        what = "a duplicate" if cid == previous else f"after {previous}"
        raise SecAggError(f"{reader.what}: client ids must ascend: {field} {cid} is {what}")
    if cid not in params._member_set:
        raise SecAggError(f"{reader.what}: {field} {cid} is not in this round's client_ids")
    return cid


def _read_own_id(reader: _Reader, expected: int, role: str) -> None:
    cid = reader.u32(f"the {role} id")
    if cid != expected:
        direction = "from" if role == "sender" else "for"
        raise SecAggError(f"{reader.what} is {direction} client {cid}, received as client {expected}")


# ---------------------------------------------------------------- primitives --


def _hkdf(ikm: bytes, params: SecAggParams, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=params.digest, info=info).derive(ikm)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _clamped(raw: bytes) -> bytes:
    """The canonical form of an X25519 private key (RFC 7748's decodeScalar25519):
    X25519 ignores the bits this clears or sets, so 2^5 byte strings share one key.
    Clients draw keys in this form and the server accepts only this form, so a
    reconstructed mask key passes its check only when it is the very bytes shared."""
    out = bytearray(raw)
    out[0] &= 248
    out[31] = (out[31] & 127) | 64
    return bytes(out)


def _exchange(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # OpenSSL refuses a low-order point (an all-zero shared secret)
        raise SecAggError(f"{what}: the X25519 exchange failed (a low-order public key)") from None


def _share_key(params: SecAggParams, secret: bytes, sender: int, recipient: int) -> bytes:
    # Both ends of a pair compute the same X25519 secret; the ids in the info make the
    # key of u -> v differ from that of v -> u, so each key encrypts one message only
    # and a fixed nonce is safe.
    return _hkdf(secret, params, _LABEL_SHARE_KEY + _u32(sender) + _u32(recipient))


def _share_ad(params: SecAggParams, sender: int, recipient: int) -> bytes:
    return _LABEL_SHARE_AD + params.digest + _u32(sender) + _u32(recipient)


def _pair_mask_key(params: SecAggParams, secret: bytes, u: int, v: int) -> bytes:
    return _hkdf(secret, params, _LABEL_PAIR_MASK + _u32(min(u, v)) + _u32(max(u, v)))


def _self_mask_key(params: SecAggParams, seed: bytes, u: int) -> bytes:
    return _hkdf(seed, params, _LABEL_SELF_MASK + _u32(u))


def _commitment(params: SecAggParams, u: int, seed: bytes) -> bytes:
    # b_u is 32 uniform bytes, so its hash hides it without a separate opening nonce.
    return hashlib.sha256(_LABEL_COMMITMENT + params.digest + _u32(u) + seed).digest()


def _field_element(draw: Callable[[int], bytes]) -> int:
    # Rejection sampling from 257-bit integers: uniform in [0, p), one draw in two kept.
    while True:
        value = int.from_bytes(_draw(draw, _SHARE_BYTES), "little") & ((1 << 257) - 1)
        if value < FIELD_PRIME:
            return value


def _draw(draw: Callable[[int], bytes], size: int) -> bytes:
    out = draw(size)
    if not isinstance(out, bytes) or len(out) != size:
        raise SecAggError(f"random_bytes({size}) returned {len(out) if isinstance(out, bytes) else type(out)} bytes")
    return out


def _shamir_split(secret: bytes, xs: Sequence[int], threshold: int, draw: Callable[[int], bytes]) -> list[int]:
    """Shares of ``secret`` (32 bytes, an integer below 2^256 < p) at the points ``xs``:
    a random polynomial of degree threshold - 1 whose constant term is the secret."""
    coefficients = [int.from_bytes(secret, "little")] + [_field_element(draw) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        acc = 0
        for c in reversed(coefficients):
            acc = (acc * x + c) % FIELD_PRIME
        shares.append(acc)
    return shares


def _lagrange_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """The value at 0 of the polynomial through ``points`` (distinct small nonzero x).
    The x are client ids + 1 (< 2^33), so the numerators and denominators are exact
    integer products; one modular inversion serves them all (Montgomery's trick)."""
    xs = [x for x, _ in points]
    product = math.prod(xs)
    dens = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den *= xj - xi
        dens.append(den % FIELD_PRIME)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % FIELD_PRIME)
    inverse = pow(prefix[-1], -1, FIELD_PRIME)
    secret = 0
    for i in range(len(xs) - 1, -1, -1):
        inv_den = inverse * prefix[i] % FIELD_PRIME  # 1 / dens[i]
        inverse = inverse * dens[i] % FIELD_PRIME
        secret += points[i][1] * (product // xs[i]) % FIELD_PRIME * inv_den
    return secret % FIELD_PRIME


def _reconstruct(points: list[tuple[int, int]], threshold: int, check: Callable[[int], bool]) -> Optional[int]:
    """The secret the shares ``points`` reconstruct and ``check`` accepts, trying the
    first ``threshold`` shares, then leaving out one share at a time, then up to
    _MAX_SUBSETS other subsets; None when none passes."""
    first = points[:threshold]
    secret = _lagrange_at_zero(first)
    if check(secret):
        return secret
    tried = {tuple(first)}
    for skip in range(threshold if len(points) > threshold else 0):
        subset = tuple(points[:skip] + points[skip + 1 : threshold + 1])
        tried.add(subset)
        secret = _lagrange_at_zero(subset)
        if check(secret):
            return secret
    for subset in itertools.islice(itertools.combinations(points, threshold), _MAX_SUBSETS):
        if subset not in tried:
            secret = _lagrange_at_zero(subset)
            if check(secret):
                return secret
    return None


def _secret_bytes(value: int) -> Optional[bytes]:
    return value.to_bytes(32, "little") if value < 1 << 256 else None


def _word_dtype(modulus_bits: int) -> np.dtype:
    # 32-bit words halve the keystream for m <= 32; 2^m divides the word range either
    # way, so the low m bits of a uniform word are uniform.
    return np.dtype(np.uint32) if modulus_bits <= 32 else np.dtype(np.uint64)


def _apply_masks(acc: np.ndarray, keys: Sequence[tuple[bytes, bool]]) -> None:
    """Adds (True) or subtracts (False) the ChaCha20 keystream of each key, read as
    little-endian words of ``acc``'s dtype, into ``acc`` (wrapping, so modulo the word
    range). The counter starts at block 0 under an all-zero nonce: each key expands one
    stream. Pieces of _CHUNK_BYTES keep the sum's piece in cache across the keys of a
    group; groups of _KEYS_PER_PASS keys bound how many cipher contexts live at once."""
    word = acc.dtype.itemsize
    wire = acc.dtype.newbyteorder("<")
    chunk = _CHUNK_BYTES // word
    zeros = memoryview(bytes(chunk * word))
    buffer = bytearray(chunk * word)
    for first in range(0, len(keys), _KEYS_PER_PASS):
        group = keys[first : first + _KEYS_PER_PASS]
        streams = [(Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor(), add) for key, add in group]
        for start in range(0, acc.size, chunk):
            piece = acc[start : start + chunk]
            size = piece.size * word
            for stream, add in streams:
                stream.update_into(zeros[:size], buffer)
                words = np.frombuffer(buffer, dtype=wire, count=piece.size)
                if add:
                    np.add(piece, words, out=piece)
                else:
                    np.subtract(piece, words, out=piece)


def _check_vector(params: SecAggParams, vector: object, what: str) -> np.ndarray:
    if not isinstance(vector, np.ndarray):
        raise SecAggError(f"{what} must be a numpy array of uint64, got {type(vector).__name__}")
    if vector.dtype != np.uint64:
        raise SecAggError(f"{what} must have dtype uint64, got {vector.dtype}")
    if vector.shape != (params.length,):
        raise SecAggError(f"{what} must have shape ({params.length},), got {vector.shape}")
    if int(vector.max()) >> params.modulus_bits:  # one pass, no temporary of L values
        i = int(np.argmax(vector >= np.uint64(1 << params.modulus_bits)))
        raise SecAggError(f"{what} must hold residues below 2^{params.modulus_bits}: {int(vector[i])} at index {i}")
    return vector


# -------------------------------------------------------------------- client --


class SecAggClient:
    """One client's side of one round. Fresh keys, seeds and polynomials each round:
    build a new client per round, never reuse one.

    ``random_bytes``: the source of every secret (os.urandom); a test may pass a
    deterministic one to get reproducible messages, nothing else should.

    Each stage runs once. A repeated call with the same message returns the same bytes
    (a retransmission); a different message is refused, because answering twice would
    leak: two sharings under one share key reuse a keystream, two masked vectors reveal
    their difference, and two unmask answers could reveal both secrets of a client.
    """

    def __init__(
        self, params: SecAggParams, client_id: int, *, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams, got {type(params).__name__}")
        client_id = _as_int(client_id, "client_id")
        params._check_member(client_id)
        self.params = params
        self.client_id = client_id
        self._draw = random_bytes
        self._share_secret = X25519PrivateKey.from_private_bytes(_clamped(_draw(random_bytes, _KEY_BYTES)))
        self._mask_secret = X25519PrivateKey.from_private_bytes(_clamped(_draw(random_bytes, _KEY_BYTES)))
        self._advertised: Optional[bytes] = None
        self._keys_in: Optional[bytes] = None
        self._shares_out: Optional[bytes] = None
        self._self_seed: Optional[bytes] = None
        self._mask_publics: dict[int, bytes] = {}  # neighbour -> its mask public key
        self._share_publics: dict[int, bytes] = {}  # neighbour -> its share public key
        self._masked = False
        self._routed: Optional[bytes] = None  # the shares message report() read
        self._report: Optional[bytes] = None
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of b, share of mask key)
        self._rejected: frozenset[int] = frozenset()  # senders whose shares failed authentication
        self._verdict: Optional[bytes] = None
        self._excluded: frozenset[int] = frozenset()  # clients the server's verdict leaves out
        self._request: Optional[bytes] = None
        self._response: Optional[bytes] = None

    def advertise(self) -> bytes:
        """Stage 1: this client's two X25519 public keys (share encryption, masks)."""
        if self._advertised is None:
            self._advertised = (
                _header(self.params, MessageType.ADVERTISE)
                + _u32(self.client_id)
                + _public_bytes(self._share_secret)
                + _public_bytes(self._mask_secret)
            )
        return self._advertised

    def share_keys(self, keys_msg: bytes) -> bytes:
        """Stage 2: given the server's keys message (the public keys of this client's
        neighbours that advertised), draws the self-mask seed b_u, Shamir-shares b_u and
        the mask secret key among those neighbours (threshold t) and returns each share
        encrypted for its recipient, with a commitment to b_u."""
        if self._advertised is None:
            raise SecAggError("share_keys before advertise: stage 1 comes first")
        if self._keys_in is not None:
            if keys_msg == self._keys_in:
                assert self._shares_out is not None
                return self._shares_out
            raise SecAggError("share_keys was already called with another keys message: each client shares once")
        p, u = self.params, self.client_id
        reader = _open(p, keys_msg, MessageType.KEYS)
        _read_own_id(reader, u, "recipient")
        count = _read_count(reader, p, "the neighbour count")
        neighbours: dict[int, tuple[bytes, bytes]] = {}
        previous = -1
        for _ in range(count):
            previous = _read_id(reader, p, previous, "neighbour id")
            if not p.are_neighbours(u, previous):
                raise SecAggError(f"{reader.what}: client {previous} is not a neighbour of client {u}")
            neighbours[previous] = (
                reader.take(_KEY_BYTES, "a share public key"),
                reader.take(_KEY_BYTES, "a mask public key"),
            )
        reader.finish()
        if count < p.t:
            raise SecAggError(
                f"only {count} of client {u}'s neighbours advertised keys, fewer than the threshold {p.t}: "
                "its secrets could not be reconstructed"
            )
        own = (_public_bytes(self._share_secret), _public_bytes(self._mask_secret))
        for v, keys in neighbours.items():
            if keys[0] in own or keys[1] in own:
                raise SecAggError(f"{reader.what}: client {v}'s public keys repeat client {u}'s own")
        seed = _draw(self._draw, _KEY_BYTES)
        xs = [v + 1 for v in neighbours]
        seed_shares = _shamir_split(seed, xs, p.t, self._draw)
        key_shares = _shamir_split(_private_bytes(self._mask_secret), xs, p.t, self._draw)
        out = [_header(p, MessageType.SHARES), _u32(u), _commitment(p, u, seed), _u32(count)]
        for (v, (share_public, _)), b_share, s_share in zip(neighbours.items(), seed_shares, key_shares):
            secret = _exchange(self._share_secret, share_public, f"client {v}'s share public key")
            aead = ChaCha20Poly1305(_share_key(p, secret, u, v))
            plaintext = b_share.to_bytes(_SHARE_BYTES, "little") + s_share.to_bytes(_SHARE_BYTES, "little")
            out += [_u32(v), aead.encrypt(bytes(12), plaintext, _share_ad(p, u, v))]
        self._self_seed = seed
        self._mask_publics = {v: keys[1] for v, keys in neighbours.items()}
        self._share_publics = {v: keys[0] for v, keys in neighbours.items()}
        self._keys_in = bytes(keys_msg)
        self._shares_out = b"".join(out)
        return self._shares_out

    def report(self, shares_msg: bytes) -> bytes:
        """Stage 3, first step: decrypts the shares the server forwards (from the
        neighbours that shared keys) and returns the report message, which names the
        senders whose shares this client could not use: a ciphertext that fails
        authentication, or a share that is not an element of the field. The server leaves
        them out of the round (a client that sends its neighbours bad shares could neither
        be unmasked nor removed) and says so in its verdict (``exclude``), which every
        client reads before it masks."""
        p, u = self.params, self.client_id
        if self._self_seed is None:
            raise SecAggError("report before share_keys: stage 2 comes first")
        if self._routed is not None:
            if shares_msg == self._routed:
                assert self._report is not None
                return self._report
            raise SecAggError("report was already called with another shares message: each client masks once")
        reader = _open(p, shares_msg, MessageType.SHARES_FOR)
        _read_own_id(reader, u, "recipient")
        count = _read_count(reader, p, "the sender count")
        ciphertexts: dict[int, bytes] = {}
        previous = -1
        for _ in range(count):
            previous = _read_id(reader, p, previous, "sender id")
            if previous not in self._mask_publics:
                raise SecAggError(f"{reader.what}: client {previous} was not among client {u}'s neighbours with keys")
            ciphertexts[previous] = reader.take(_CIPHERTEXT_BYTES, f"client {previous}'s ciphertext")
        reader.finish()
        if count < p.t:
            raise SecAggError(
                f"only {count} of client {u}'s neighbours shared keys, fewer than the threshold {p.t}: "
                "its self-mask could not be reconstructed"
            )
        held: dict[int, tuple[int, int]] = {}
        rejected = []
        for v, ciphertext in ciphertexts.items():
            secret = _exchange(self._share_secret, self._share_publics[v], f"client {v}'s share public key")
            try:
                plaintext = ChaCha20Poly1305(_share_key(p, secret, v, u)).decrypt(
                    bytes(12), ciphertext, _share_ad(p, v, u)
                )
            except InvalidTag:  # altered in transit, or encrypted under other keys
                rejected.append(v)
                continue
            b_share = int.from_bytes(plaintext[:_SHARE_BYTES], "little")
            s_share = int.from_bytes(plaintext[_SHARE_BYTES:], "little")
            if b_share >= FIELD_PRIME or s_share >= FIELD_PRIME:
                rejected.append(v)
                continue
            held[v] = (b_share, s_share)
        self._held = held
        self._rejected = frozenset(rejected)
        self._routed = bytes(shares_msg)
        self._report = b"".join(
            [_header(p, MessageType.REPORT), _u32(u), _u32(len(rejected)), *(_u32(v) for v in rejected)]
        )
        return self._report

    @property
    def rejected(self) -> tuple[int, ...]:
        """The senders whose shares this client could not use (see ``report``)."""
        return tuple(sorted(self._rejected))

    def exclude(self, verdict: bytes) -> None:
        """Stage 3, second step: reads the server's verdict, the clients out of the round
        because a neighbour reported their shares; this client will not mask with them.
        Refuses a verdict that leaves out a client this client reported (its pairwise
        mask could not be removed), or that leaves out this client (it is out of the
        round: it must not send a masked vector)."""
        p, u = self.params, self.client_id
        if self._routed is None:
            raise SecAggError("exclude before report: the shares message comes first")
        if self._verdict is not None:
            if verdict == self._verdict:
                return
            raise SecAggError("exclude was already called with another verdict")
        if self._masked:
            raise SecAggError("exclude after mask: the verdict comes before the masked vector")
        reader = _open(p, verdict, MessageType.VERDICT)
        count = _read_count(reader, p, "the excluded count")
        excluded = set()
        previous = -1
        for _ in range(count):
            previous = _read_id(reader, p, previous, "excluded id")
            excluded.add(previous)
        reader.finish()
        missing = sorted(self._rejected - excluded)
        if missing:
            raise SecAggError(
                f"the verdict leaves clients {missing} in the round, but client {u} reported their shares"
            )
        if u in excluded:
            raise SecAggError(f"the verdict leaves client {u} (this client) out of the round")
        self._excluded = frozenset(excluded)
        self._verdict = bytes(verdict)

    def mask(self, codes: np.ndarray, shares_msg: Optional[bytes] = None) -> np.ndarray:
        """Stage 3: returns y_u, ``codes`` (uint64, shape (L,), each below 2^m) plus the
        self mask and the pairwise masks with the neighbours whose shares this client
        holds and the verdict (``exclude``) leaves in, modulo 2^m, as uint64.
        ``shares_msg``: the server's shares message, for a round without reports and
        verdict (every neighbour's shares must then be good); without it, ``report`` and
        ``exclude`` come first."""
        p, u = self.params, self.client_id
        if self._self_seed is None:
            raise SecAggError("mask before share_keys: stage 2 comes first")
        if self._masked:
            raise SecAggError(
                "mask was already called: masking a second vector with the same masks reveals the difference"
            )
        codes = _check_vector(p, codes, "codes")
        reported = self._routed is not None  # report() came first: the verdict must have too
        if shares_msg is not None:
            self.report(shares_msg)
        elif not reported:
            raise SecAggError("mask before report: the shares message comes first")
        if reported and self._verdict is None:
            raise SecAggError("mask before the verdict: a client that reports masks after reading it (exclude)")
        if self._rejected and self._verdict is None:
            raise SecAggError(
                f"client {u} reported clients {sorted(self._rejected)}: it masks after the server's verdict (exclude)"
            )
        keys = [(_self_mask_key(p, self._self_seed, u), True)]
        for v in self._held:
            if v in self._excluded:
                continue
            secret = _exchange(self._mask_secret, self._mask_publics[v], f"client {v}'s mask public key")
            keys.append((_pair_mask_key(p, secret, u, v), v > u))
        acc = codes.astype(_word_dtype(p.modulus_bits))
        _apply_masks(acc, keys)
        self._masked = True
        out = acc.astype(np.uint64, copy=False)
        np.bitwise_and(out, np.uint64((1 << p.modulus_bits) - 1), out=out)
        return out

    def unmask(self, request: bytes) -> bytes:
        """Stage 4: for each neighbour that shared keys with this client, the share of
        its self-mask seed if the request says its masked vector arrived, of its mask
        key if it dropped. Refuses a request that asks both of one client, marks this
        client dropped, disagrees with what this client saw, or leaves the survivors
        disconnected; answers only one request per round."""
        p, u = self.params, self.client_id
        if not self._masked:
            raise SecAggError("unmask before mask: stage 3 comes first")
        if self._request is not None:
            if request == self._request:
                assert self._response is not None
                return self._response
            raise SecAggError(
                "unmask was already answered for another request: answering two could reveal both secrets of a client"
            )
        status = _parse_request(p, request)
        if status[u] != SURVIVED:
            raise SecAggError(f"the unmask request does not list client {u} (this client) as surviving")
        survivors = [c for c, s in status.items() if s == SURVIVED]
        if len(survivors) < p.t:
            raise SecAggError(f"the unmask request lists {len(survivors)} survivors, fewer than the threshold {p.t}")
        for v in p._neighbours_among(u, p._member_set):
            if v in self._rejected or v in self._excluded:
                if status[v] != 0:
                    raise SecAggError(
                        f"the unmask request asks about client {v}, but the verdict left it out of the round"
                    )
            elif v in self._held and status[v] == 0:
                raise SecAggError(f"the unmask request marks client {v} absent, but it shared keys with client {u}")
            elif v not in self._held and status[v] != 0:
                raise SecAggError(f"the unmask request marks client {v} present, but it shared no keys with client {u}")
        if not p.connected(survivors):
            raise SecAggError(
                "the unmask request's survivors form a disconnected graph: unmasking would reveal partial sums"
            )
        answered = sorted(v for v in self._held if v not in self._excluded)
        out = [_header(p, MessageType.UNMASK), _u32(u), _u32(len(answered))]
        for v in answered:
            kind = status[v]
            share = self._held[v][0 if kind == SURVIVED else 1]
            out += [_u32(v), bytes([kind]), share.to_bytes(_SHARE_BYTES, "little")]
        self._request = bytes(request)
        self._response = b"".join(out)
        return self._response


def _parse_request(params: SecAggParams, request: object) -> dict[int, int]:
    """Client id -> status (0 absent, SURVIVED, DROPPED) of an unmask request."""
    reader = _open(params, request, MessageType.UNMASK_REQUEST)
    bitmap = reader.take((params.n + 3) // 4, "the status bitmap")
    reader.finish()
    status = {}
    for i, cid in enumerate(params.client_ids):
        value = (bitmap[i // 4] >> (2 * (i % 4))) & 0b11
        if value == SURVIVED | DROPPED:
            raise SecAggError(
                f"the unmask request asks for both the self-mask and the mask-key shares of client {cid}: "
                "an honest client never reveals both"
            )
        status[cid] = value
    padding = bitmap[-1] >> (2 * (params.n % 4)) if params.n % 4 else 0
    if padding:
        raise SecAggError(f"the unmask request's padding bits must be zero, got {padding:#x}")
    return status


# -------------------------------------------------------------------- server --


class _Stage(enum.IntEnum):
    ADVERTISE = 1
    SHARE_KEYS = 2
    MASK = 3
    UNMASK = 4
    DONE = 5


_STAGE_NAMES = {
    _Stage.ADVERTISE: "stage 1 (advertise)",
    _Stage.SHARE_KEYS: "stage 2 (share keys)",
    _Stage.MASK: "stage 3 (masked vectors)",
    _Stage.UNMASK: "stage 4 (unmask)",
    _Stage.DONE: "done (the correction was computed)",
}


class SecAggServer:
    """The server's side of one round: it routes the clients' messages, records who
    took part in each stage, and computes the correction vector.

    Each ``*_for`` call closes the stage whose messages it routes: the first
    ``keys_for`` closes advertisements, the first ``shares_for`` closes key sharing,
    ``unmask_request`` closes masked vectors (``receive_masked``). A late message for a
    closed stage is a SecAggError; the client counts as dropped.

    ``protocol_bytes``: the protocol's own traffic, apart from the masked vectors:
    bytes received and sent per stage. Each ``keys_for`` and ``shares_for`` call counts
    as sent; the unmask request counts once per surviving client it must reach.

    Not thread-safe: a federation that receives on several threads serializes its
    calls (each is short but for ``correction``).
    """

    def __init__(self, params: SecAggParams) -> None:
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams, got {type(params).__name__}")
        self.params = params
        self._stage = _Stage.ADVERTISE
        self._keys: dict[int, bytes] = {}  # client -> share public key | mask public key
        self._commitments: dict[int, bytes] = {}
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> ciphertext
        self._delivered: set[int] = set()
        self._rejected: dict[int, frozenset[int]] = {}  # reporter -> senders whose shares it could not use
        self._verdict: Optional[bytes] = None  # closes the reports
        self._excluded: frozenset[int] = frozenset()  # the clients the verdict leaves out
        self._masked: set[int] = set()
        self._survivors: frozenset[int] = frozenset()
        self._request: Optional[bytes] = None
        self._responses: dict[int, dict[int, int]] = {}  # responder -> owner -> share
        self._correction: Optional[np.ndarray] = None
        self._bytes = dict.fromkeys(
            (
                "advertise_received",
                "keys_sent",
                "shares_received",
                "shares_sent",
                "reports_received",
                "verdict_sent",
                "unmask_request_sent",
                "unmask_received",
            ),
            0,
        )

    @property
    def protocol_bytes(self) -> dict[str, int]:
        """Bytes of protocol messages received and sent, by stage (a copy)."""
        return dict(self._bytes)

    @property
    def advertised(self) -> tuple[int, ...]:
        """Clients whose keys arrived in stage 1."""
        return tuple(sorted(self._keys))

    @property
    def shared(self) -> tuple[int, ...]:
        """Clients whose encrypted shares arrived in stage 2."""
        return tuple(sorted(self._ciphertexts))

    @property
    def survivors(self) -> tuple[int, ...]:
        """Clients whose masked vectors are in the sum (fixed by ``unmask_request``)."""
        return tuple(sorted(self._survivors))

    @property
    def reports(self) -> dict[int, tuple[int, ...]]:
        """Who named whom: {reporter: the clients its report named}, for the reports that
        named anyone (a copy). Reports cannot be verified: an operator can see who uses them."""
        return {v: tuple(sorted(named)) for v, named in sorted(self._rejected.items()) if named}

    @property
    def reported(self) -> tuple[int, ...]:
        """Clients whose shares a neighbour reported unusable (``receive_report``): the
        verdict leaves them out of the round, and they count as dropped."""
        return tuple(sorted(set().union(*self._rejected.values())))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Clients that shared keys but whose masked vectors are not in the sum."""
        return tuple(sorted(set(self._ciphertexts) - self._survivors)) if self._request else ()

    def _expect(self, stage: _Stage, call: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"{call} belongs to {_STAGE_NAMES[stage]}, the round is at {_STAGE_NAMES[self._stage]}")

    def _member(self, client_id: object) -> int:
        cid = _as_int(client_id, "client_id")
        self.params._check_member(cid)
        return cid

    def receive_advertise(self, client_id: int, msg: bytes) -> None:
        """Stage 1: records ``client_id``'s public keys."""
        self._expect(_Stage.ADVERTISE, "receive_advertise")
        cid = self._member(client_id)
        if cid in self._keys:
            raise SecAggError(f"client {cid} already advertised keys")
        reader = _open(self.params, msg, MessageType.ADVERTISE)
        _read_own_id(reader, cid, "sender")
        keys = reader.take(2 * _KEY_BYTES, "the two public keys")
        reader.finish()
        if keys[:_KEY_BYTES] == keys[_KEY_BYTES:]:
            raise SecAggError(f"client {cid} advertised the same public key twice")
        probe = X25519PrivateKey.generate()  # a low-order key would fail every neighbour's exchange
        for which, key in (("share", keys[:_KEY_BYTES]), ("mask", keys[_KEY_BYTES:])):
            _exchange(probe, key, f"client {cid}'s {which} public key")
        for other, known in self._keys.items():
            if {keys[:_KEY_BYTES], keys[_KEY_BYTES:]} & {known[:_KEY_BYTES], known[_KEY_BYTES:]}:
                raise SecAggError(f"client {cid} advertised a public key of client {other}")
        self._keys[cid] = keys
        self._bytes["advertise_received"] += len(reader.data)

    def _with_keys(self, cid: int) -> list[int]:
        return self.params._neighbours_among(cid, self._keys)

    def keys_for(self, client_id: int) -> bytes:
        """Stage 2: the public keys of ``client_id``'s neighbours that advertised
        (closes stage 1 on the first call)."""
        cid = self._member(client_id)
        if self._stage == _Stage.ADVERTISE:
            self._stage = _Stage.SHARE_KEYS
        if cid not in self._keys:
            raise SecAggError(f"client {cid} did not advertise keys in stage 1")
        neighbours = self._with_keys(cid)
        if len(neighbours) < self.params.t:
            raise SecAggError(
                f"only {len(neighbours)} of client {cid}'s neighbours advertised keys, fewer than the threshold "
                f"{self.params.t}: client {cid} cannot take part"
            )
        out = [_header(self.params, MessageType.KEYS), _u32(cid), _u32(len(neighbours))]
        for v in neighbours:
            out += [_u32(v), self._keys[v]]
        msg = b"".join(out)
        self._bytes["keys_sent"] += len(msg)
        return msg

    def receive_shares(self, client_id: int, msg: bytes) -> None:
        """Stage 2: records ``client_id``'s commitment and encrypted shares, one for
        each neighbour that advertised, in ascending order."""
        self._expect(_Stage.SHARE_KEYS, "receive_shares")
        cid = self._member(client_id)
        if cid not in self._keys:
            raise SecAggError(f"client {cid} did not advertise keys in stage 1")
        if cid in self._ciphertexts:
            raise SecAggError(f"client {cid} already sent its shares")
        p = self.params
        reader = _open(p, msg, MessageType.SHARES)
        _read_own_id(reader, cid, "sender")
        commitment = reader.take(32, "the commitment")
        count = _read_count(reader, p, "the recipient count")
        expected = self._with_keys(cid)
        if count != len(expected):
            raise SecAggError(
                f"{reader.what}: {count} recipients, expected {len(expected)} (client {cid}'s neighbours with keys)"
            )
        ciphertexts = {}
        previous = -1
        for want in expected:
            previous = _read_id(reader, p, previous, "recipient id")
            if previous != want:
                raise SecAggError(f"{reader.what}: recipient {previous} where client {want} was expected")
            ciphertexts[previous] = reader.take(_CIPHERTEXT_BYTES, f"the ciphertext for client {previous}")
        reader.finish()
        self._commitments[cid] = commitment
        self._ciphertexts[cid] = ciphertexts
        self._bytes["shares_received"] += len(reader.data)

    def _holders(self, cid: int, members: Collection[int]) -> list[int]:
        """The clients among ``members`` that masked with ``cid``: its neighbours, none
        for a client the verdict left out (they hold its shares, if any, all the same)."""
        return [] if cid in self._excluded else self.params._neighbours_among(cid, members)

    def shares_for(self, client_id: int) -> bytes:
        """Stage 3: the ciphertexts addressed to ``client_id`` by its neighbours that
        shared keys (closes stage 2 on the first call)."""
        cid = self._member(client_id)
        if self._stage < _Stage.SHARE_KEYS:
            raise SecAggError(
                f"shares_for belongs to stage 3 (masked vectors), the round is at {_STAGE_NAMES[self._stage]}"
            )
        if self._stage == _Stage.SHARE_KEYS:
            self._stage = _Stage.MASK
        if cid not in self._ciphertexts:
            raise SecAggError(f"client {cid} did not share keys in stage 2")
        senders = self.params._neighbours_among(cid, self._ciphertexts)
        if len(senders) < self.params.t:
            raise SecAggError(
                f"only {len(senders)} of client {cid}'s neighbours shared keys, fewer than the threshold "
                f"{self.params.t}: client {cid} cannot take part"
            )
        out = [_header(self.params, MessageType.SHARES_FOR), _u32(cid), _u32(len(senders))]
        for v in senders:
            out += [_u32(v), self._ciphertexts[v][cid]]
        msg = b"".join(out)
        self._delivered.add(cid)
        self._bytes["shares_sent"] += len(msg)
        return msg

    def receive_report(self, client_id: int, msg: bytes) -> None:
        """Stage 3: records which of the senders whose shares ``client_id`` was sent it
        could not use (``SecAggClient.report``). Those senders are out of the round: the
        verdict lists them, nobody masks with them, their masked vectors are refused, and
        they count as dropped. Reports close with the verdict (or the first masked vector):
        the federation collects every client's before it sends the verdict."""
        self._expect(_Stage.MASK, "receive_report")
        if self._verdict is not None:
            raise SecAggError("receive_report after the verdict or a masked vector: the reports are closed")
        cid = self._member(client_id)
        if cid not in self._delivered:
            raise SecAggError(f"client {cid} was not sent its shares (shares_for), so it cannot report on them")
        if cid in self._rejected:
            raise SecAggError(f"client {cid} already sent its report")
        p = self.params
        reader = _open(p, msg, MessageType.REPORT)
        _read_own_id(reader, cid, "sender")
        count = _read_count(reader, p, "the reported count")
        senders = set(self.params._neighbours_among(cid, self._ciphertexts))
        reported = []
        previous = -1
        for _ in range(count):
            previous = _read_id(reader, p, previous, "reported id")
            if previous not in senders:
                raise SecAggError(f"{reader.what}: client {previous} sent no shares to client {cid}")
            reported.append(previous)
        reader.finish()
        self._rejected[cid] = frozenset(reported)
        self._bytes["reports_received"] += len(reader.data)

    def verdict(self) -> bytes:
        """Stage 3: closes the reports and returns the verdict, one message for every
        client still in the round: the clients a report named, which nobody masks with
        and whose masked vectors are refused. While a report names a client, no masked
        vector is accepted before the verdict; the first masked vector closes the reports
        too. Each call counts as sent."""
        self._expect(_Stage.MASK, "verdict")
        verdict = self._close_reports()
        self._bytes["verdict_sent"] += len(verdict)
        return verdict

    def _close_reports(self) -> bytes:
        if self._verdict is None:
            excluded = self.reported
            self._excluded = frozenset(excluded)
            self._verdict = b"".join(
                [_header(self.params, MessageType.VERDICT), _u32(len(excluded)), *(_u32(v) for v in excluded)]
            )
        return self._verdict

    def receive_masked(self, client_id: int, masked: Optional[np.ndarray] = None) -> None:
        """Stage 3: records that ``client_id``'s masked vector arrived and is in the
        sum (which another component computes). ``masked``, when given, is checked:
        uint64, shape (L,), residues below 2^m."""
        self._expect(_Stage.MASK, "receive_masked")
        cid = self._member(client_id)
        if cid not in self._delivered:
            raise SecAggError(f"client {cid} was not sent its shares (shares_for), so it cannot have masked")
        if cid in self._masked:
            raise SecAggError(f"client {cid}'s masked vector already arrived")
        if self._verdict is None:
            if self.reported:
                raise SecAggError(
                    f"client {cid}'s masked vector before the verdict: reports name clients {list(self.reported)}, "
                    "and the clients mask after reading it"
                )
            self._close_reports()  # a later report could name a client this vector is masked with
        reporters = sorted(v for v, rejected in self._rejected.items() if cid in rejected)
        if reporters:
            raise SecAggError(
                f"client {cid} is out of the round: clients {reporters} reported its shares unusable "
                "(failed authentication, or not field elements)"
            )
        if self._rejected and cid not in self._rejected:
            raise SecAggError(
                f"client {cid} sent no report: in a round with reports, every client reports before it masks"
            )
        if masked is not None:
            _check_vector(self.params, masked, f"client {cid}'s masked vector")
        self._masked.add(cid)

    def unmask_request(self) -> bytes:
        """Stage 4: closes stage 3 and says who survived (masked vector in the sum) and
        who dropped after sharing keys, as one message for every surviving client.
        SecAggError, leaving stage 3 open, when the survivors cannot be unmasked: fewer
        than the threshold, a client with fewer than t surviving neighbours holding its
        shares, or a disconnected graph of survivors."""
        if self._request is not None:
            return self._request
        self._expect(_Stage.MASK, "unmask_request")
        p = self.params
        survivors = frozenset(self._masked)
        if len(survivors) < p.t:
            raise SecAggError(
                f"too many dropouts: {len(survivors)} masked vectors arrived, fewer than the threshold {p.t}"
            )
        if not p.connected(survivors):
            raise SecAggError("the survivors form a disconnected graph: unmasking would reveal partial sums")
        for v in sorted(self._ciphertexts):
            holders = self._holders(v, survivors)
            if v not in survivors and not holders:
                continue  # no survivor masked with v: nothing of v's to remove
            if len(holders) < p.t:
                secret = "self-mask" if v in survivors else "mask key"
                raise SecAggError(
                    f"too many dropouts: client {v}'s {secret} needs {p.t} shares, and only {len(holders)} of its "
                    "neighbours holding them survive"
                )
        bitmap = bytearray((p.n + 3) // 4)
        for i, cid in enumerate(p.client_ids):
            # 0 for a client the verdict left out too: nobody masked with it, and its mask key
            # has no use (its holders would reveal their shares of it for nothing).
            dropped = cid in self._ciphertexts and cid not in self._excluded
            value = SURVIVED if cid in survivors else DROPPED if dropped else 0
            bitmap[i // 4] |= value << (2 * (i % 4))
        self._request = _header(p, MessageType.UNMASK_REQUEST) + bytes(bitmap)
        self._survivors = survivors
        self._stage = _Stage.UNMASK
        self._bytes["unmask_request_sent"] += len(self._request) * len(survivors)
        return self._request

    def receive_unmask(self, client_id: int, msg: bytes) -> None:
        """Stage 4: records a surviving client's shares: of the self-mask seed of each
        surviving neighbour, of the mask key of each dropped one."""
        self._expect(_Stage.UNMASK, "receive_unmask")
        cid = self._member(client_id)
        if cid not in self._survivors:
            raise SecAggError(f"client {cid} is not a survivor of this round")
        if cid in self._responses:
            raise SecAggError(f"client {cid} already answered the unmask request")
        p = self.params
        reader = _open(p, msg, MessageType.UNMASK)
        _read_own_id(reader, cid, "sender")
        count = _read_count(reader, p, "the share count")
        left_out = self._rejected.get(cid, frozenset()) | self._excluded
        expected = [v for v in self.params._neighbours_among(cid, self._ciphertexts) if v not in left_out]
        if count != len(expected):
            raise SecAggError(
                f"{reader.what}: {count} shares, expected {len(expected)} (client {cid}'s neighbours that shared "
                "keys, less those the verdict left out)"
            )
        shares = {}
        previous = -1
        for want in expected:
            previous = _read_id(reader, p, previous, "owner id")
            if previous != want:
                raise SecAggError(f"{reader.what}: a share of client {previous} where client {want} was expected")
            kind = reader.u8(f"the kind of client {previous}'s share")
            expected_kind = SURVIVED if previous in self._survivors else DROPPED
            if kind != expected_kind:
                raise SecAggError(f"{reader.what}: client {previous}'s share has kind {kind}, expected {expected_kind}")
            value = int.from_bytes(reader.take(_SHARE_BYTES, f"client {previous}'s share"), "little")
            if value >= FIELD_PRIME:
                raise SecAggError(f"{reader.what}: client {previous}'s share is not an element of the field")
            shares[previous] = value
        reader.finish()
        self._responses[cid] = shares
        self._bytes["unmask_received"] += len(reader.data)

    def _recover(self, v: int, secret: str, check: Callable[[int], bool]) -> int:
        holders = [w for w in sorted(self._responses) if v in self._responses[w]]
        what = f"cannot reconstruct client {v}'s {secret}"
        if len(holders) < self.params.t:
            raise SecAggError(
                f"{what}: {len(holders)} shares arrived (from clients {holders}), the threshold is {self.params.t}"
            )
        points = [(w + 1, self._responses[w][v]) for w in holders]
        value = _reconstruct(points, self.params.t, check)
        if value is None:
            raise SecAggError(
                f"{what}: no {self.params.t} of the {len(points)} shares received (from clients {holders}) give "
                "the committed value: bad shares"
            )
        return value

    def correction(self) -> np.ndarray:
        """The vector c (uint64, shape (L,), residues modulo 2^m) such that the sum of
        the survivors' masked vectors minus c is the sum of their codes, modulo 2^m:
        their self masks, and the pairwise masks they share with clients that dropped.
        Each secret is reconstructed from t shares and checked against the commitment
        (self-mask seeds) or the advertised public key (mask keys); a bad share is left
        out when enough others arrived. Computed once: later calls return the same
        read-only array."""
        if self._correction is not None:
            return self._correction
        self._expect(_Stage.UNMASK, "correction")
        p = self.params
        keys: list[tuple[bytes, bool]] = []
        for v in sorted(self._survivors):

            def seed_matches(value: int, v: int = v) -> bool:
                seed = _secret_bytes(value)
                return seed is not None and hmac.compare_digest(_commitment(p, v, seed), self._commitments[v])

            seed = _secret_bytes(self._recover(v, "self-mask", seed_matches))
            assert seed is not None
            keys.append((_self_mask_key(p, seed, v), True))
        for v in self.dropped:
            masked_with = self._holders(v, self._survivors)
            if not masked_with:
                continue
            mask_public = self._keys[v][_KEY_BYTES:]

            def key_matches(value: int, mask_public: bytes = mask_public) -> bool:
                raw = _secret_bytes(value)
                return (
                    raw is not None
                    and raw == _clamped(raw)
                    and hmac.compare_digest(_public_bytes(X25519PrivateKey.from_private_bytes(raw)), mask_public)
                )

            raw = _secret_bytes(self._recover(v, "mask key", key_matches))
            assert raw is not None
            private = X25519PrivateKey.from_private_bytes(raw)
            for u in masked_with:
                secret = _exchange(private, self._keys[u][_KEY_BYTES:], f"client {u}'s mask public key")
                # u added PRG(s_uv) when v > u and subtracted it otherwise: c carries the same sign.
                keys.append((_pair_mask_key(p, secret, u, v), v > u))
        acc = np.zeros(p.length, dtype=_word_dtype(p.modulus_bits))
        _apply_masks(acc, keys)
        out = acc.astype(np.uint64, copy=False)
        np.bitwise_and(out, np.uint64((1 << p.modulus_bits) - 1), out=out)
        out.flags.writeable = False
        self._correction = out
        self._stage = _Stage.DONE
        return out


# --------------------------------------------------------------- in process --


def secure_sum(
    params: SecAggParams,
    codes_by_client: Mapping[int, np.ndarray],
    dropped_after_sending: Iterable[int] = (),
    dropped_before_sending: Iterable[int] = (),
    *,
    protocol_bytes: Optional[dict[str, int]] = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> np.ndarray:
    """Runs a whole round in this process and returns the sum modulo 2^m (uint64) of
    the codes of every client that sent its masked vector, computed the way the server
    does: the masked vectors' sum minus the correction.

    ``codes_by_client``: uint64 codes (shape (L,), below 2^m) of every client in
    ``params.client_ids``, except that those in ``dropped_before_sending`` (they share
    keys, then vanish before sending a masked vector) may be left out.
    ``dropped_after_sending``: clients whose masked vectors arrive (and count) but who
    vanish before answering the unmask request. ``protocol_bytes``, when given, is
    updated with the server's per-stage byte counts.
    """
    ids = params.client_ids
    after = {_as_int(c, "a dropped client id") for c in dropped_after_sending}
    before = {_as_int(c, "a dropped client id") for c in dropped_before_sending}
    for cid in after | before:
        params._check_member(cid)
    if after & before:
        raise ValueError(f"clients {sorted(after & before)} cannot drop both before and after sending")
    missing = [c for c in ids if c not in before and c not in codes_by_client]
    if missing:
        raise ValueError(f"codes_by_client lacks the codes of clients {missing}")
    clients = {cid: SecAggClient(params, cid, random_bytes=random_bytes) for cid in ids}
    server = SecAggServer(params)
    for cid, client in clients.items():
        server.receive_advertise(cid, client.advertise())
    for cid, client in clients.items():
        server.receive_shares(cid, client.share_keys(server.keys_for(cid)))
    mask = np.uint64((1 << params.modulus_bits) - 1)
    total = np.zeros(params.length, dtype=np.uint64)
    pending: dict[int, SecAggClient] = {}
    for cid, client in clients.items():
        shares = server.shares_for(cid)
        if cid in before:
            continue
        server.receive_report(cid, client.report(shares))
        pending[cid] = client
    for cid, client in pending.items():  # every report is in: the verdict, then the masked vectors
        if cid not in server.reported:
            client.exclude(server.verdict())
            masked = client.mask(codes_by_client[cid])
            server.receive_masked(cid, masked)
            np.add(total, masked, out=total)  # wraps modulo 2^64, a multiple of 2^m
    request = server.unmask_request()
    for cid in server.survivors:
        if cid not in after:
            server.receive_unmask(cid, clients[cid].unmask(request))
    np.subtract(total, server.correction(), out=total)
    np.bitwise_and(total, mask, out=total)
    if protocol_bytes is not None:
        protocol_bytes.update(server.protocol_bytes)
    return total
