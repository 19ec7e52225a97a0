"""Secure aggregation in the TCP federation: what a round under ``fedpress server
--secure-aggregation`` agrees on, for the server (``SecureRound``) and for each client
(``client_round``). The protocol itself is ``fedpress.secagg``; its messages travel in
SECAGG frames (``protocol.SecAgg``), and the masked codes in the UPDATE's payload, an
``intB`` payload that ``fedpress.Aggregator`` sums modulo 2^m.

A round: the TASK's config carries ``secagg`` (the sampled clients, m, the vector's
length, the public graph seed, the threshold and degree); each client advertises its
keys (SECAGG step 1), receives its neighbours' (2), sends its encrypted shares (3),
receives those addressed to it (4), trains and sends its masked update (UPDATE); the
server asks the survivors for the shares that unmask the sum (5, 6) and subtracts the
correction from the aggregator's sum. Clients need no option: the config says it all.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .._seeds import PURPOSE_SECAGG, derive_seed
from ..codec import parse_spec
from ..format.intcodes import modulus_bits
from ..format.reader import parse
from ..format.registry import PURPOSE_RANDK, PURPOSE_RHT, stage_seed
from ..privacy import skellam_noise
from ..secagg import SecAggClient, SecAggParams, SecAggServer
from . import protocol as P

__all__ = ["SecureSettings", "secure_settings", "SecureRound", "check_masked_update", "masked_codes", "client_round"]

# A SECAGG frame on the wire: the frame header, the round and step, the sealing tag.
_FRAME_OVERHEAD = P.HEADER.size + 5 + P.TRAILER_BYTES


@dataclass(frozen=True)
class SecureSettings:
    """What every round of a secure run shares: the codec's bits and modulus, the length
    of the code vector (every float coordinate of the model) and the dropout tolerance."""

    codec: str
    bits: int
    modulus_bits: int
    length: int
    dropout_tolerance: float


def secure_settings(
    codec: Any, params: Mapping[str, np.ndarray], clients_per_round: int, dropout_tolerance: float
) -> SecureSettings:
    """Checks that a run can aggregate securely (ValueError naming what is wrong)."""
    if not codec:
        raise ValueError("secure aggregation needs an intB codec, e.g. codec='int8:clip=0.01'")
    spec = parse_spec(codec)
    if not spec.int_bits:
        raise ValueError(
            f"secure aggregation sums integer codes: the codec must be intB (e.g. 'int8:clip=0.01'), got {spec}"
        )
    if spec.sparsifier is not None and not spec.shared_support:
        raise ValueError(
            f"secure aggregation sums every coordinate: {spec} keeps a different subset per client, whose masked "
            "codes would not add up; drop the sparsifier, or keep a shared random subset (randk:R:shared)"
        )
    if spec.int_clients < clients_per_round:
        raise ValueError(
            f"the codec's nmax={spec.int_clients} is below clients_per_round={clients_per_round}: sums could wrap; "
            f"use e.g. {spec.values}:clip={spec.int_clip}:nmax={clients_per_round}"
        )
    if clients_per_round < 2:
        raise ValueError("secure aggregation needs at least 2 clients per round")
    tolerance = float(dropout_tolerance)
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"dropout_tolerance must be in [0, 1), got {dropout_tolerance}")
    floats = [name for name, a in params.items() if np.asarray(a).dtype.kind == "f"]
    others = [name for name in params if name not in floats]
    if others:
        raise ValueError(
            f"secure aggregation sums float tensors only; the model's {others[0]!r} would travel in the clear"
        )
    sizes = [int(np.asarray(params[name]).size) for name in floats]
    # randk:R:shared: each client sends the codes of the round's kept entries only
    length = sum(spec.kept(n) if spec.shared_support else n for n in sizes)
    if length == 0:
        raise ValueError("secure aggregation needs a model with float parameters")
    # Refuses a tolerance too high for the round's size, now rather than in round 1.
    SecAggParams(
        client_ids=list(range(clients_per_round)),
        modulus_bits=modulus_bits(spec.int_bits, spec.int_clients),
        length=length,
        seed=bytes(32),
        dropout_tolerance=tolerance,
    )
    return SecureSettings(str(spec), spec.int_bits, modulus_bits(spec.int_bits, spec.int_clients), length, tolerance)


def _graph_seed(seed: int, r: int) -> bytes:
    """The round's public graph seed (32 bytes): it places clients in the SecAgg+ graph."""
    return hashlib.sha256(derive_seed(seed, PURPOSE_SECAGG, r).to_bytes(8, "little")).digest()


class SecureRound:
    """The server's side of one secure round: the sampled clients (by position in sorted
    order, their protocol ids), the protocol's server, and its traffic in SECAGG frames."""

    def __init__(self, r: int, sampled: list[str], settings: SecureSettings, seed: int, rotation_seed: int) -> None:
        self.round = r
        self.rotation_seed = rotation_seed  # the round's, from its config: every client rotates with it
        self.clients = sorted(sampled)
        self.settings = settings
        self.params = SecAggParams(
            client_ids=list(range(len(self.clients))),
            modulus_bits=settings.modulus_bits,
            length=settings.length,
            seed=_graph_seed(seed, r),
            dropout_tolerance=settings.dropout_tolerance,
        )
        self.server = SecAggServer(self.params)
        self.frame_bytes = {"uplink": 0, "downlink": 0}
        self.started = time.monotonic()
        self.error: str = ""

    def config(self) -> dict[str, Any]:
        """The TASK config's ``secagg`` entry (the same for every client of the round)."""
        p = self.params
        return {
            "clients": self.clients,
            "modulus_bits": p.modulus_bits,
            "length": p.length,
            "seed": p.seed.hex(),
            "threshold": p.threshold,
            "degree": p.degree,
        }

    def index(self, client_id: str) -> int:
        return self.clients.index(client_id)

    def count(self, direction: str, message: bytes) -> None:
        """Counts one SECAGG frame carrying ``message`` (``uplink`` or ``downlink``)."""
        self.frame_bytes[direction] += len(message) + _FRAME_OVERHEAD

    def summary(self) -> dict[str, Any]:
        """The round's secure aggregation, for rounds.jsonl: who took part in each stage,
        the threshold and graph, and the protocol's traffic apart from the payloads."""
        s, p = self.server, self.params
        name = self.clients.__getitem__
        return {
            "clients": len(self.clients),
            "advertised": len(s.advertised),
            "shared_keys": len(s.shared),
            "survivors": [name(i) for i in s.survivors],
            "dropped": [name(i) for i in s.dropped],
            # who named whom in a report: those named are out (reports are taken on trust)
            "reports": {name(v): [name(c) for c in named] for v, named in s.reports.items()},
            "threshold": p.threshold,
            "degree": p.degree,
            "modulus_bits": p.modulus_bits,
            "length": p.length,
            "protocol_message_bytes": s.protocol_bytes,
            "protocol_uplink_wire_bytes": self.frame_bytes["uplink"],
            "protocol_downlink_wire_bytes": self.frame_bytes["downlink"],
            "seconds": round(time.monotonic() - self.started, 6),
            "error": self.error or None,
        }


def check_masked_update(secure: SecureRound, client_id: str, payload: Any, weight: float) -> None:
    """ValueError unless ``payload`` can join the round's secure sum: a client that shared
    its keys in the round, and every tensor masked ``intB`` codes of the round's codec,
    modulus and rotation, recording ``weight`` (an integer; 1 under DP) and, for
    ``randk:R:shared``, the round's support. Anything else would corrupt the sum, or
    be added in the clear."""
    if secure.index(client_id) not in secure.server.shared:
        raise ValueError("the client took no part in the round's key sharing")
    spec = parse_spec(secure.settings.codec)
    # The structure is enough here; the aggregator's add verifies the checksum (one pass, not two).
    parsed = parse(payload, defer_checksum=True)
    for rec in parsed.tensors:
        sec = rec.intcode
        where = f"tensor {rec.name!r}"
        if sec is None or not sec.masked:
            raise ValueError(f"{where} is not masked int codes: it would be summed in the clear")
        lv = sec.levels
        expected = (spec.int_bits, float(np.float32(spec.int_clip)), secure.settings.modulus_bits)
        if (lv.bits, lv.clip, lv.modulus_bits) != expected:
            raise ValueError(f"{where}: int{lv.bits} clip={lv.clip} m={lv.modulus_bits}, the round's is {expected}")
        if lv.rotation_seed != stage_seed(secure.rotation_seed, rec.ordinal, PURPOSE_RHT):
            raise ValueError(f"{where} is not rotated with the round's seed")
        if sec.weight != int(weight):
            raise ValueError(f"{where} records weight {sec.weight}, the server weighs it {weight:g}")
        if spec.shared_support and sec.support_seed != stage_seed(secure.rotation_seed, rec.ordinal, PURPOSE_RANDK):
            raise ValueError(f"{where} does not keep the round's shared random-k support")


def masked_codes(
    client: SecAggClient, skellam_mu: Optional[float], rng: np.random.Generator, codes: np.ndarray
) -> np.ndarray:
    """The codes as a client of a secure round sends them, once it has read the server's
    verdict: with distributed DP's Skellam noise (``skellam_mu`` per coordinate, or none)
    added first, then masked modulo 2^m."""
    if skellam_mu:
        modulus = np.uint64((1 << client.params.modulus_bits) - 1)
        noise = skellam_noise(codes.size, float(skellam_mu), rng)
        codes = (codes + noise.astype(np.uint64)) & modulus  # two's complement: negative noise wraps
    return client.mask(codes)


def client_round(config: Mapping[str, Any], client_id: str) -> SecAggClient:
    """A client's side of a secure round, from the TASK config's ``secagg`` entry
    (ValueError when it is malformed or does not list this client)."""
    try:
        clients = list(config["clients"])
        index = clients.index(client_id)
        params = SecAggParams(
            client_ids=list(range(len(clients))),
            modulus_bits=int(config["modulus_bits"]),
            length=int(config["length"]),
            seed=bytes.fromhex(str(config["seed"])),
            threshold=int(config["threshold"]),
            degree=int(config["degree"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed secure aggregation config: {exc!r}") from None
    except ValueError as exc:
        raise ValueError(f"secure aggregation config: {exc}") from None
    return SecAggClient(params, index)
