"""Tests of fedpress.secagg, the secure aggregation protocol: exact sums under dropouts
at every stage, masks indistinguishable from uniform, what a colluding minority cannot
learn, bad shares and malformed messages refused with SecAggError, and the derivations
of docs/secure-aggregation.md checked against independent references (ChaCha20 and
HKDF written here from their RFCs, the threshold rule from a float hypergeometric)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from fedpress import secagg
from fedpress.secagg import (
    DROPPED,
    FIELD_PRIME,
    SURVIVED,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    secure_sum,
)
from hypothesis import given
from hypothesis import strategies as st

SEED = bytes(range(32))
HEADER = 12  # magic, version, type, round tag


def deterministic(*label: object) -> Callable[[int], bytes]:
    """A reproducible stand-in for os.urandom (tests only)."""
    counter = itertools.count()

    def draw(size: int) -> bytes:
        return hashlib.shake_256(repr((label, next(counter))).encode()).digest(size)

    return draw


def random_codes(rng: np.random.Generator, ids: Iterable[int], m: int, length: int) -> dict[int, np.ndarray]:
    return {c: rng.integers(0, 1 << m, length, dtype=np.uint64) for c in ids}


@dataclasses.dataclass
class Round:
    """One round run through the message API, with what each party saw."""

    params: SecAggParams
    clients: dict[int, SecAggClient]
    server: SecAggServer
    masked: dict[int, np.ndarray]
    messages: dict[str, dict[int, bytes]]
    request: bytes
    result: np.ndarray
    expected: np.ndarray


def run_round(
    params: SecAggParams,
    codes: dict[int, np.ndarray],
    *,
    rng: np.random.Generator,
    absent: Iterable[int] = (),
    before_shares: Iterable[int] = (),
    before_masked: Iterable[int] = (),
    after_masked: Iterable[int] = (),
    finish: bool = True,
) -> Round:
    """Runs a round with clients vanishing before stage 1 (``absent``), before sending
    shares, before sending their masked vector, or after it; each stage's messages
    reach the server in a random order."""
    clients = {c: SecAggClient(params, c, random_bytes=deterministic(params.seed, c)) for c in params.client_ids}
    server = SecAggServer(params)

    def shuffled(ids: Iterable[int]) -> list[int]:
        ids = list(ids)
        return [ids[i] for i in rng.permutation(len(ids))]

    gone = set(absent)
    messages: dict[str, dict[int, bytes]] = {k: {} for k in ("advertise", "keys", "shares", "shares_for", "unmask")}
    for c in shuffled(c for c in params.client_ids if c not in gone):
        messages["advertise"][c] = clients[c].advertise()
        server.receive_advertise(c, messages["advertise"][c])
    gone |= set(before_shares)
    for c in shuffled(c for c in params.client_ids if c not in gone):
        messages["keys"][c] = server.keys_for(c)
        messages["shares"][c] = clients[c].share_keys(messages["keys"][c])
    for c in shuffled(messages["shares"]):
        server.receive_shares(c, messages["shares"][c])
    gone |= set(before_masked)
    mask = np.uint64((1 << params.modulus_bits) - 1)
    total = np.zeros(params.length, np.uint64)
    expected = np.zeros(params.length, np.uint64)
    masked = {}
    for c in shuffled(c for c in params.client_ids if c not in gone):
        messages["shares_for"][c] = server.shares_for(c)
        masked[c] = clients[c].mask(codes[c], messages["shares_for"][c])
        server.receive_masked(c, masked[c])
        total += masked[c]
        expected += codes[c]
    result = np.zeros(0, np.uint64)
    request = b""
    if finish:
        request = server.unmask_request()
        for c in shuffled(c for c in server.survivors if c not in set(after_masked)):
            messages["unmask"][c] = clients[c].unmask(request)
            server.receive_unmask(c, messages["unmask"][c])
        correction = server.correction()
        assert not correction.flags.writeable and server.correction() is correction
        result = (total - correction) & mask
    return Round(params, clients, server, masked, messages, request, result, expected & mask)


def spread_dropouts(rng: np.random.Generator, ids: tuple[int, ...], count: int) -> dict[str, list[int]]:
    """``count`` clients, each vanishing at a random stage."""
    stages: dict[str, list[int]] = {"absent": [], "before_shares": [], "before_masked": [], "after_masked": []}
    for c in rng.choice(ids, count, replace=False).tolist():
        stages[list(stages)[int(rng.integers(4))]].append(c)
    return stages


# ------------------------------------------------------------------ exact sums --


@pytest.mark.parametrize("n", [2, 3, 10, 40])
@pytest.mark.parametrize("m", [2, 12, 33, 62])
def test_sum_is_exact_under_dropouts_at_every_stage(n: int, m: int) -> None:
    rng = np.random.default_rng([n, m])
    ids = tuple(sorted(rng.choice(1 << 32, n, replace=False).tolist()))
    params = SecAggParams(ids, m, 1001, rng.bytes(32), dropout_tolerance=0.3)
    assert params.complete and params.t == n - 1 - math.floor(0.3 * n)
    codes = random_codes(rng, ids, m, params.length)
    for trial in range(3):
        dropouts = spread_dropouts(rng, ids, math.floor(0.3 * n) if trial else 0)
        done = run_round(params, codes, rng=rng, **dropouts)
        np.testing.assert_array_equal(done.result, done.expected)
        sent = [c for c in ids if c not in set(itertools.chain(*list(dropouts.values())[:3]))]
        assert done.server.survivors == tuple(sorted(sent))


@given(
    n=st.integers(2, 9),
    m=st.integers(2, 62),
    length=st.integers(1, 40),
    tolerance=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.4]),
    seed=st.binary(min_size=32, max_size=32),
    draws=st.integers(0, 2**32),
)
def test_sum_is_exact_for_any_small_round(
    n: int, m: int, length: int, tolerance: float, seed: bytes, draws: int
) -> None:
    rng = np.random.default_rng(draws)
    dropouts_allowed = math.floor(tolerance * n)
    if 2 * (n - 1 - dropouts_allowed) <= n - 1:  # the complete graph's threshold rule
        with pytest.raises(ValueError, match=f"dropout_tolerance {tolerance} is unsafe for {n} clients"):
            SecAggParams(list(range(n)), m, length, seed, dropout_tolerance=tolerance)
        return
    params = SecAggParams(list(range(3, 3 + 2 * n, 2)), m, length, seed, dropout_tolerance=tolerance)
    assert params.complete and params.t == n - 1 - dropouts_allowed
    codes = random_codes(rng, params.client_ids, m, length)
    dropouts = spread_dropouts(rng, params.client_ids, int(rng.integers(0, dropouts_allowed + 1)))
    done = run_round(params, codes, rng=rng, **dropouts)
    np.testing.assert_array_equal(done.result, done.expected)


@pytest.mark.parametrize("m, keys_per_pass", [(12, 4096), (33, 4096), (12, 2)])
def test_sum_is_exact_across_keystream_chunks(m: int, keys_per_pass: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Several pieces of _CHUNK_BYTES and a ragged last one, in 32- and 64-bit words;
    # the keys in one pass, or two at a time.
    monkeypatch.setattr(secagg, "_KEYS_PER_PASS", keys_per_pass)
    rng = np.random.default_rng(m)
    params = SecAggParams([3, 5, 9, 12], m, 3 * 65536 + 17, SEED, dropout_tolerance=0.25)
    codes = random_codes(rng, params.client_ids, m, params.length)
    done = run_round(params, codes, rng=rng, before_masked=[5])
    np.testing.assert_array_equal(done.result, done.expected)


@pytest.mark.parametrize("n, tolerance, degree", [(60, 0.1, None), (41, 0.05, 8), (30, 0.0, 4)])
def test_sum_is_exact_on_sparse_graphs(n: int, tolerance: float, degree: Any) -> None:
    rng = np.random.default_rng(n)
    params = SecAggParams(list(range(n)), 20, 257, SEED, dropout_tolerance=tolerance, degree=degree)
    assert not params.complete
    codes = random_codes(rng, params.client_ids, 20, params.length)
    count = math.floor(tolerance * n)
    for _ in range(3):
        done = run_round(params, codes, rng=rng, **spread_dropouts(rng, params.client_ids, count))
        np.testing.assert_array_equal(done.result, done.expected)


def test_secure_sum_and_its_byte_counts() -> None:
    rng = np.random.default_rng(7)
    n, length = 10, 500
    params = SecAggParams(list(range(100, 100 + n)), 12, length, SEED)
    codes = random_codes(rng, params.client_ids, 12, length)
    counts: dict[str, int] = {}
    total = secure_sum(
        params, codes, dropped_after_sending=[101], dropped_before_sending=[105, 107], protocol_bytes=counts
    )
    expected = sum(codes[c] for c in params.client_ids if c not in (105, 107)) & np.uint64(4095)
    np.testing.assert_array_equal(total, expected)
    assert total.dtype == np.uint64 and total.shape == (length,)
    # Every client took part in stages 1 and 2 (complete graph: n - 1 neighbours each);
    # 8 survivors got the request, 7 answered with n - 1 shares each.
    k, share, ciphertext = n - 1, 33, 82
    assert counts == {
        "advertise_received": n * (HEADER + 4 + 64),
        "keys_sent": n * (HEADER + 8 + k * 68),
        "shares_received": n * (HEADER + 4 + 32 + 4 + k * (4 + ciphertext)),
        "shares_sent": n * (HEADER + 8 + k * (4 + ciphertext)),
        "reports_received": 8 * (HEADER + 8),  # the 8 clients that masked, none reporting
        "verdict_sent": 8 * (HEADER + 4),  # to the same 8, leaving nobody out
        "unmask_request_sent": 8 * (HEADER + (n + 3) // 4),
        "unmask_received": 7 * (HEADER + 8 + k * (4 + 1 + share)),
    }
    with pytest.raises(ValueError, match=r"lacks the codes of clients \[103\]"):
        secure_sum(params, {c: v for c, v in codes.items() if c != 103})
    with pytest.raises(ValueError, match="both before and after"):
        secure_sum(params, codes, dropped_after_sending=[101], dropped_before_sending=[101])


def test_too_many_dropouts_is_a_clear_error() -> None:
    rng = np.random.default_rng(3)
    params = SecAggParams(list(range(10)), 12, 64, SEED)  # t = 6: 3 dropouts tolerated
    codes = random_codes(rng, params.client_ids, 12, 64)
    with pytest.raises(SecAggError, match=r"too many dropouts: client \d's self-mask needs 6 shares, and only 5"):
        secure_sum(params, codes, dropped_before_sending=[1, 2, 3, 4])
    # Four vanish after sending: their vectors are in the sum, too few shares come back.
    with pytest.raises(
        SecAggError, match=r"cannot reconstruct client 0's self-mask: 5 shares arrived .* threshold is 6"
    ):
        secure_sum(params, codes, dropped_after_sending=[1, 2, 3, 4])
    with pytest.raises(
        SecAggError, match=r"only 5 of client \d's neighbours advertised keys, fewer than the threshold 6"
    ):
        run_round(params, codes, rng=rng, absent=[1, 2, 3, 4])
    with pytest.raises(SecAggError, match=r"only 5 of client \d's neighbours shared keys, fewer than the threshold 6"):
        run_round(params, codes, rng=rng, before_shares=[1, 2, 3, 4])
    # Exactly the tolerance, at mixed stages, still works.
    done = run_round(params, codes, rng=rng, absent=[1], before_masked=[2], after_masked=[3])
    np.testing.assert_array_equal(done.result, done.expected)


def test_an_unmask_request_that_fails_leaves_stage_3_open() -> None:
    rng = np.random.default_rng(4)
    params = SecAggParams(list(range(10)), 12, 32, SEED)
    codes = random_codes(rng, params.client_ids, 12, 32)
    done = run_round(params, codes, rng=rng, before_masked=[1, 2, 3, 4], finish=False)
    with pytest.raises(SecAggError, match="too many dropouts"):
        done.server.unmask_request()
    late = done.clients[4].mask(codes[4], done.server.shares_for(4))
    done.server.receive_masked(4, late)
    request = done.server.unmask_request()
    for c in done.server.survivors:
        done.server.receive_unmask(c, done.clients[c].unmask(request))
    total = sum(done.masked.values()) + late
    expected = sum(codes[c] for c in done.server.survivors)
    np.testing.assert_array_equal((total - done.server.correction()) & np.uint64(4095), expected & np.uint64(4095))


# ------------------------------------------------------------------ the masks --


def chi_square_uniform(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=bins)
    expected = values.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_vectors_look_uniform() -> None:
    length = 1 << 16
    params = SecAggParams([1, 2, 3], 8, length, SEED, dropout_tolerance=0.0)
    zeros = np.zeros(length, np.uint64)
    constant = np.full(length, 200, np.uint64)
    done = run_round(params, {1: zeros, 2: constant, 3: zeros}, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(done.result, np.full(length, 200, np.uint64))
    # chi-square with 255 degrees of freedom: mean 255, sd 22.6; 420 is beyond 7 sd. The
    # codes themselves (all zero, or all 200) score 16.7 million.
    for c in (1, 2, 3):
        assert chi_square_uniform(done.masked[c], 256) < 420
    assert chi_square_uniform(zeros, 256) > 1e6
    # The masked sum too: the pairwise masks cancel there, the self masks must not.
    masked_sum = (done.masked[1] + done.masked[2] + done.masked[3]) & np.uint64(255)
    assert chi_square_uniform(masked_sum, 256) < 420
    # Means of two different inputs: 127.5 each, sd 0.29 over 65536 values.
    means = [float(done.masked[c].mean()) for c in (1, 2)]
    assert abs(means[0] - 127.5) < 2 and abs(means[1] - 127.5) < 2 and abs(means[0] - means[1]) < 2.5
    assert abs(float(zeros.mean()) - float(constant.mean())) > 100


def test_every_bit_of_a_62_bit_mask_is_balanced() -> None:
    length = 20000
    params = SecAggParams([1, 2], 62, length, SEED, dropout_tolerance=0.0)
    done = run_round(
        params,
        random_codes(np.random.default_rng(1), [1, 2], 62, length) | {1: np.zeros(length, np.uint64)},
        rng=np.random.default_rng(1),
    )
    masked = done.masked[1]
    ones = [(masked >> np.uint64(b) & np.uint64(1)).mean() for b in range(64)]
    assert all(abs(f - 0.5) < 0.02 for f in ones[:62]), ones  # sd 0.0035
    assert ones[62] == ones[63] == 0


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    """RFC 8439 section 2.3, written from the RFC."""

    def rotl(v: int, c: int) -> int:
        return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))

    def quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 7)

    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    state += list(struct.unpack("<8I", key)) + [counter] + list(struct.unpack("<3I", nonce))
    s = list(state)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):
            quarter(s, a, b, c, d)
        for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(s, a, b, c, d)
    return struct.pack("<16I", *((x + y) & 0xFFFFFFFF for x, y in zip(s, state)))


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 for one 32-byte block, written from the RFC."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_chacha20_reference_matches_rfc_8439() -> None:
    # RFC 8439 section 2.3.2: key 00..1f, counter 1, nonce 000000090000004a00000000.
    block = chacha20_block(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    assert block[:16].hex() == "10f1e7e4d13b5915500fdd1fa32071c4"


@pytest.mark.parametrize("m", [7, 32, 33, 62])
def test_mask_expansion_follows_the_document(m: int) -> None:
    """The PRG of docs/secure-aggregation.md: HKDF-SHA256 of the seed, ChaCha20 from
    block 0 with a zero nonce, little-endian 32-bit words for m <= 32 (64-bit above),
    the low m bits."""
    params = SecAggParams([4, 9], m, 37, SEED, dropout_tolerance=0.0)
    seed = bytes(range(100, 132))
    key = hkdf_sha256(seed, params.digest, b"fedpress secagg v1 self mask" + struct.pack("<I", 9))
    assert key == secagg._self_mask_key(params, seed, 9)
    word = 4 if m <= 32 else 8
    stream = b"".join(chacha20_block(key, i, bytes(12)) for i in range(-(-37 * word // 64)))[: 37 * word]
    reference = np.frombuffer(stream, "<u4" if word == 4 else "<u8").astype(np.uint64) & np.uint64((1 << m) - 1)
    acc = np.zeros(37, np.uint32 if word == 4 else np.uint64)
    secagg._apply_masks(acc, [(key, True)])
    np.testing.assert_array_equal(acc.astype(np.uint64) & np.uint64((1 << m) - 1), reference)
    secagg._apply_masks(acc, [(key, False)])
    assert not acc.any()
    digest = hashlib.sha256(
        b"fedpress secagg v1 round" + SEED + struct.pack("<BQIII", m, 37, 1, 1, 2) + struct.pack("<2I", 4, 9)
    ).digest()
    assert params.digest == digest and params.round_tag == digest[:8]


def test_golden_transcript() -> None:
    """Pins every byte of a round's messages under a fixed randomness source: a change
    of layout or derivation fails here (regenerate only with a new VERSION)."""
    params = SecAggParams([1, 2, 3], 12, 16, SEED, dropout_tolerance=0.0)
    codes = {c: np.arange(16, dtype=np.uint64) * np.uint64(c) for c in (1, 2, 3)}
    done = run_round(params, codes, rng=np.random.default_rng(0))
    transcript = hashlib.sha256()
    for kind in ("advertise", "keys", "shares", "shares_for", "unmask"):
        for c in sorted(done.messages[kind]):
            transcript.update(done.messages[kind][c])
    transcript.update(done.request)
    for c in sorted(done.masked):
        transcript.update(done.masked[c].astype("<u8").tobytes())
    advertise = done.messages["advertise"][1]
    assert advertise[:16] == b"SA\x01\x01" + params.round_tag + struct.pack("<I", 1) and len(advertise) == 80
    assert transcript.hexdigest() == GOLDEN_TRANSCRIPT


GOLDEN_TRANSCRIPT = "976c4d2fe44e62ce8c9eb7463a46b9a83f964e7484533f02d238b98a98d1737c"


# ------------------------------------------------------------------- security --


def lagrange_at_zero(points: list[tuple[int, int]]) -> int:
    """Written here from the textbook formula, one modular inversion per point."""
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % FIELD_PRIME
                den = den * (xj - xi) % FIELD_PRIME
        secret = (secret + yi * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    return secret


def test_a_colluding_minority_learns_neither_secret_of_a_client() -> None:
    rng = np.random.default_rng(11)
    params = SecAggParams(list(range(10)), 12, 64, SEED)  # t = 6
    codes = random_codes(rng, params.client_ids, 12, 64)
    done = run_round(params, codes, rng=rng, finish=False)
    target, server = 0, done.server
    request = server.unmask_request()
    colluders = [1, 2, 3, 4, 5]  # t - 1 clients with the server
    # What the colluders hold of the target's secrets (all they decrypted in stage 3).
    held = {w: done.clients[w]._held[target] for w in colluders}
    commitment = server._commitments[target]
    mask_public = server._keys[target][32:]

    def is_seed(value: int) -> bool:
        seed = secagg._secret_bytes(value)
        return seed is not None and secagg._commitment(params, target, seed) == commitment

    def is_mask_key(value: int) -> bool:
        raw = secagg._secret_bytes(value)
        return (
            raw is not None
            and raw == secagg._clamped(raw)
            and secagg._public_bytes(secagg.X25519PrivateKey.from_private_bytes(raw)) == mask_public
        )

    # t - 1 shares interpolate to a wrong secret, as does any guess of a t-th share.
    for kind, check in ((0, is_seed), (1, is_mask_key)):
        points = [(w + 1, held[w][kind]) for w in colluders]
        assert not check(lagrange_at_zero(points))
        for guess in (0, 1, FIELD_PRIME - 1):
            assert not check(lagrange_at_zero(points + [(6 + 1, guess)]))
        # One honest share more (t in all) gives it: the test can tell a right answer.
        assert check(lagrange_at_zero(points + [(7, done.clients[6]._held[target][kind])]))
    # The server cannot get the missing shares from honest clients: a request asking
    # for both shares of the target is refused, and so is a second request.
    status = {c: SURVIVED for c in params.client_ids} | {target: SURVIVED | DROPPED}
    with pytest.raises(SecAggError, match="asks for both the self-mask and the mask-key shares of client 0"):
        done.clients[6].unmask(make_request(params, status))
    answer = done.clients[6].unmask(request)  # the round's request: client 0 survived
    status[target] = DROPPED
    with pytest.raises(SecAggError, match="already answered for another request"):
        done.clients[6].unmask(make_request(params, status))
    assert done.clients[6].unmask(request) == answer  # a retransmission


def make_request(params: SecAggParams, status: dict[int, int]) -> bytes:
    bitmap = bytearray((params.n + 3) // 4)
    for i, c in enumerate(params.client_ids):
        bitmap[i // 4] |= status.get(c, 0) << (2 * (i % 4))
    return b"SA\x01\x05" + params.round_tag + bytes(bitmap)


def test_honest_clients_refuse_inconsistent_requests() -> None:
    rng = np.random.default_rng(12)
    params = SecAggParams(list(range(6)), 12, 8, SEED, dropout_tolerance=0.2)  # t = 4
    codes = random_codes(rng, params.client_ids, 12, 8)
    done = run_round(params, codes, rng=rng, absent=[5], finish=False)
    client = done.clients[0]
    everyone = {c: SURVIVED for c in range(5)}
    cases = [
        (everyone | {0: DROPPED}, "does not list client 0 .* as surviving"),
        (everyone | {1: 0}, "marks client 1 absent, but it shared keys with client 0"),
        (everyone | {5: SURVIVED}, "marks client 5 present, but it shared no keys with client 0"),
        (
            {0: SURVIVED, 1: SURVIVED, 2: SURVIVED, 3: DROPPED, 4: DROPPED},
            "lists 3 survivors, fewer than the threshold 4",
        ),
    ]
    for status, message in cases:
        with pytest.raises(SecAggError, match=message):
            client.unmask(make_request(params, status))
    request = make_request(params, everyone)
    padded = bytearray(request)
    padded[-1] |= 0b1100_0000  # client 5's bits are 0b0000_xx00; the padding's are above
    with pytest.raises(SecAggError, match="padding bits must be zero"):
        client.unmask(bytes(padded))
    client.unmask(request)  # the consistent request is answered


def test_disconnected_survivors_are_refused() -> None:
    params = SecAggParams(list(range(40)), 12, 8, SEED, threshold=3, degree=4)
    order = sorted(params.client_ids, key=lambda c: params._positions[c])
    # Two runs of k/2 = 2 consecutive positions removed split the cycle in two.
    gone = {order[5], order[6], order[25], order[26]}
    survivors = [c for c in params.client_ids if c not in gone]
    assert not params.connected(survivors)
    assert params.connected([c for c in params.client_ids if c not in {order[5], order[6], order[25]}])
    assert params.connected([c for c in params.client_ids if c not in {order[5], order[25], order[26]}])
    rng = np.random.default_rng(13)
    codes = random_codes(rng, params.client_ids, 12, 8)
    done = run_round(params, codes, rng=rng, before_masked=sorted(gone), finish=False)
    with pytest.raises(SecAggError, match="survivors form a disconnected graph"):
        done.server.unmask_request()
    status = {c: SURVIVED for c in survivors} | dict.fromkeys(gone, DROPPED)
    with pytest.raises(SecAggError, match="form a disconnected graph"):
        done.clients[order[15]].unmask(make_request(params, status))


def test_each_stage_runs_once() -> None:
    rng = np.random.default_rng(14)
    params = SecAggParams([1, 2, 3, 4], 12, 8, SEED, dropout_tolerance=0.25)
    codes = random_codes(rng, params.client_ids, 12, 8)
    done = run_round(params, codes, rng=rng, finish=False)
    client, server = done.clients[1], done.server
    assert client.advertise() == done.messages["advertise"][1]
    assert client.share_keys(done.messages["keys"][1]) == done.messages["shares"][1]
    with pytest.raises(SecAggError, match="already called with another keys message"):
        client.share_keys(server.keys_for(2))
    with pytest.raises(SecAggError, match="mask was already called"):
        client.mask(codes[1], done.messages["shares_for"][1])
    fresh = SecAggClient(params, 1)
    with pytest.raises(SecAggError, match="share_keys before advertise"):
        fresh.share_keys(done.messages["keys"][1])
    with pytest.raises(SecAggError, match="receive_advertise belongs to stage 1 .*, the round is at stage 3"):
        server.receive_advertise(1, done.messages["advertise"][1])
    with pytest.raises(SecAggError, match="receive_unmask belongs to stage 4"):
        server.receive_unmask(1, b"")
    with pytest.raises(SecAggError, match="client 1's masked vector already arrived"):
        server.receive_masked(1)
    with pytest.raises(SecAggError, match="client 99 is not in this round's client_ids"):
        server.keys_for(99)


# ------------------------------------------------------------------ bad shares --


def test_an_altered_ciphertext_is_reported() -> None:
    rng = np.random.default_rng(20)
    params = SecAggParams(list(range(5)), 12, 16, SEED)
    codes = random_codes(rng, params.client_ids, 12, 16)
    done = run_round(params, codes, rng=rng, finish=False, before_masked=params.client_ids)
    forwarded = done.server.shares_for(2)
    # A byte of the second entry's ciphertext (sender 1): header, recipient and count,
    # sender 0's id and ciphertext, sender 1's id, then 30 bytes into its ciphertext.
    offset = HEADER + 8 + (4 + 82) + 4 + 30
    altered = forwarded[:offset] + bytes([forwarded[offset] ^ 1]) + forwarded[offset + 1 :]
    report = done.clients[2].report(altered)
    assert report == secagg._header(params, secagg.MessageType.REPORT) + struct.pack("<III", 2, 1, 1)
    assert done.clients[2].rejected == (1,)
    assert done.clients[2].report(altered) == report  # a retransmission
    with pytest.raises(SecAggError, match="report was already called with another shares message"):
        done.clients[2].report(forwarded)
    # Client 1's ciphertext relabelled as client 0's: another key and associated data.
    forwarded = done.server.shares_for(3)
    entry = HEADER + 8
    relabelled = forwarded[: entry + 4] + forwarded[entry + 90 : entry + 172] + forwarded[entry + 86 :]
    done.clients[3].report(relabelled)
    assert done.clients[3].rejected == (0,)
    # The intact message: an empty report, then the verdict and the masked vector.
    assert done.clients[4].report(done.server.shares_for(4)) == (
        secagg._header(params, secagg.MessageType.REPORT) + struct.pack("<II", 4, 0)
    )
    done.clients[4].exclude(secagg._header(params, secagg.MessageType.VERDICT) + struct.pack("<I", 0))
    masked = done.clients[4].mask(codes[4])
    assert masked.shape == (16,) and masked.dtype == np.uint64


def alter_shares(message: bytes, recipients: Iterable[int]) -> bytes:
    """A SHARES message with a byte of the ciphertext for each of ``recipients`` flipped."""
    out = bytearray(message)
    count = struct.unpack_from("<I", out, HEADER + 4 + 32)[0]
    at = HEADER + 4 + 32 + 4
    for _ in range(count):
        (recipient,) = struct.unpack_from("<I", out, at)
        if recipient in recipients:
            out[at + 4 + 40] ^= 0x80
        at += 4 + 82
    return bytes(out)


@pytest.mark.parametrize(
    "victims", [(0, 1, 3, 4, 5), (1,), (1, 3), (3, 4, 5)], ids=["to every neighbour", "to one", "to two", "to three"]
)
def test_a_client_that_sends_bad_shares_is_left_out(victims: tuple[int, ...]) -> None:
    """Client 2 encrypts bad shares for some neighbours (however many: the threshold is 4
    of 5): they report it, the server's verdict leaves it out, nobody masks with it, its
    masked vector is refused, and the sum of the others comes out exact."""
    rng = np.random.default_rng(21)
    params = SecAggParams(list(range(6)), 14, 40, SEED)
    codes = random_codes(rng, params.client_ids, 14, 40)
    clients = {c: SecAggClient(params, c, random_bytes=deterministic("bad", c)) for c in params.client_ids}
    server = SecAggServer(params)
    for c, client in clients.items():
        server.receive_advertise(c, client.advertise())
    for c, client in clients.items():
        shares = client.share_keys(server.keys_for(c))
        server.receive_shares(c, alter_shares(shares, victims) if c == 2 else shares)
    for c, client in clients.items():
        server.receive_report(c, client.report(server.shares_for(c)))
        assert client.rejected == ((2,) if c in victims else ())
    assert server.reported == (2,)
    with pytest.raises(SecAggError, match="mask before the verdict: a client that reports masks after reading it"):
        clients[0].mask(codes[0])
    with pytest.raises(SecAggError, match="client 0's masked vector before the verdict"):
        server.receive_masked(0, np.zeros(params.length, np.uint64))
    verdict = server.verdict()
    assert verdict == secagg._header(params, secagg.MessageType.VERDICT) + struct.pack("<II", 1, 2)
    with pytest.raises(SecAggError, match="the verdict leaves client 2 .this client. out of the round"):
        clients[2].exclude(verdict)
    with pytest.raises(SecAggError, match="receive_report after the verdict or a masked vector: the reports are"):
        server.receive_report(2, clients[2].report(server.shares_for(2)))
    total = np.zeros(params.length, np.uint64)
    for c, client in clients.items():
        if c == 2:  # out of the round (its exclude refuses the verdict): whatever it sends is refused
            masked = codes[c]
        else:
            if c in victims:  # a verdict that keeps a client it reported in is refused
                with pytest.raises(SecAggError, match=r"leaves clients \[2\] in the round, but client"):
                    client.exclude(secagg._header(params, secagg.MessageType.VERDICT) + struct.pack("<I", 0))
            client.exclude(verdict)
            masked = client.mask(codes[c])
        if c == 2:
            with pytest.raises(SecAggError, match=r"client 2 is out of the round: clients \[.*\] reported its shares"):
                server.receive_masked(c, masked)
            continue
        server.receive_masked(c, masked)
        total += masked
    request = server.unmask_request()
    assert server.dropped == (2,)
    # Every client refuses a request that counts the client the verdict left out.
    bitmap = bytearray(request[HEADER:])
    bitmap[0] = (bitmap[0] & ~(0b11 << 4)) | (SURVIVED << 4)
    for c in (victims[0], 0 if victims[0] else 1):
        with pytest.raises(SecAggError, match="asks about client 2, but the verdict left it out of the round"):
            clients[c].unmask(request[:HEADER] + bytes(bitmap))
    for c in server.survivors:
        server.receive_unmask(c, clients[c].unmask(request))
    result = (total - server.correction()) & np.uint64((1 << 14) - 1)
    expected = sum(codes[c] for c in params.client_ids if c != 2) & np.uint64((1 << 14) - 1)
    np.testing.assert_array_equal(result, expected)


def test_reports_are_checked() -> None:
    rng = np.random.default_rng(22)
    params = SecAggParams(list(range(5)), 12, 16, SEED)
    codes = random_codes(rng, params.client_ids, 12, 16)
    done = run_round(params, codes, rng=rng, finish=False, before_masked=params.client_ids)
    server = done.server
    forwarded = {c: server.shares_for(c) for c in params.client_ids}
    head = secagg._header(params, secagg.MessageType.REPORT)
    with pytest.raises(SecAggError, match="report message is from client 1, received as client 0"):
        server.receive_report(0, head + struct.pack("<II", 1, 0))
    with pytest.raises(SecAggError, match="client ids must ascend"):
        server.receive_report(0, head + struct.pack("<IIII", 0, 2, 3, 1))
    with pytest.raises(SecAggError, match="reported id 9 is not in this round's client_ids"):
        server.receive_report(0, head + struct.pack("<III", 0, 1, 9))
    with pytest.raises(SecAggError, match="has 4 trailing bytes"):
        server.receive_report(0, head + struct.pack("<III", 0, 0, 7))
    server.receive_report(0, done.clients[0].report(forwarded[0]))
    with pytest.raises(SecAggError, match="client 0 already sent its report"):
        server.receive_report(0, done.clients[0].report(forwarded[0]))
    with pytest.raises(SecAggError, match="client 1 sent no report: in a round with reports, every client"):
        server.receive_masked(1, done.clients[1].mask(codes[1], forwarded[1]))  # no report of its own
    verdict = secagg._header(params, secagg.MessageType.VERDICT) + struct.pack("<I", 0)
    assert server.verdict() == verdict  # nobody named: nobody left out
    with pytest.raises(SecAggError, match="receive_report after the verdict or a masked vector"):
        server.receive_report(2, done.clients[2].report(forwarded[2]))
    # Without any report, the first masked vector closes the reports (a round run without them).
    other = run_round(params, codes, rng=rng, finish=False, before_masked=params.client_ids)
    other.server.receive_masked(1, other.clients[1].mask(codes[1], other.server.shares_for(1)))
    with pytest.raises(SecAggError, match="receive_report after the verdict or a masked vector"):
        other.server.receive_report(0, other.clients[0].report(other.server.shares_for(0)))
    with pytest.raises(SecAggError, match="verdict message has 4 trailing bytes"):
        done.clients[2].exclude(verdict + bytes(4))
    with pytest.raises(SecAggError, match="exclude before report"):
        done.clients[3].exclude(verdict)
    done.clients[2].report(forwarded[2])
    done.clients[2].exclude(verdict)
    done.clients[2].exclude(verdict)  # a retransmission
    with pytest.raises(SecAggError, match="exclude was already called with another verdict"):
        done.clients[2].exclude(secagg._header(params, secagg.MessageType.VERDICT) + struct.pack("<II", 1, 4))


def test_a_low_order_public_key_is_refused_at_advertisement() -> None:
    params = SecAggParams(list(range(3)), 12, 16, SEED)
    server = SecAggServer(params)
    good = SecAggClient(params, 0).advertise()
    key_start = len(good) - 64
    low_order = good[:key_start] + bytes(32) + good[key_start + 32 :]  # the identity point
    with pytest.raises(SecAggError, match="low-order public key"):
        server.receive_advertise(0, low_order)
    server.receive_advertise(0, good)


def tamper_share(message: bytes, owner_index: int) -> bytes:
    """Adds 1 to the share of the ``owner_index``-th entry of an unmask message: it
    still parses and is a field element, but is wrong."""
    data = bytearray(message)
    start = HEADER + 8 + owner_index * 38 + 5
    value = (int.from_bytes(data[start : start + 33], "little") + 1) % FIELD_PRIME
    data[start : start + 33] = value.to_bytes(33, "little")
    return bytes(data)


@pytest.mark.parametrize("dropped", [False, True])
def test_a_wrong_share_is_detected_and_left_out(dropped: bool) -> None:
    rng = np.random.default_rng(21)
    params = SecAggParams(list(range(10)), 12, 32, SEED)  # t = 6
    codes = random_codes(rng, params.client_ids, 12, 32)
    before = [9] if dropped else []
    done = run_round(params, codes, rng=rng, before_masked=before, finish=False)
    request = done.server.unmask_request()
    # Client 3's share of client 9 (its last entry) is wrong: 8 or 9 honest shares remain.
    for c in done.server.survivors:
        message = done.clients[c].unmask(request)
        done.server.receive_unmask(c, tamper_share(message, 8) if c == 3 else message)
    total = sum(done.masked.values())
    np.testing.assert_array_equal((total - done.server.correction()) & np.uint64(4095), done.expected)


@pytest.mark.parametrize("dropped", [False, True])
def test_a_wrong_share_encrypted_by_its_sender_is_left_out(dropped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 9 encrypts a wrong share for client 4: it authenticates, and only the
    reconstruction's check against the commitment or public key finds it."""
    split = secagg._shamir_split

    def skewed(secret: bytes, xs: list[int], threshold: int, draw: Callable[[int], bytes]) -> list[int]:
        shares = split(secret, xs, threshold, draw)
        if xs[-1] == 8 + 1:  # client 9's neighbours are 0..8
            shares[4] = (shares[4] + 1) % FIELD_PRIME
        return shares

    monkeypatch.setattr(secagg, "_shamir_split", skewed)
    rng = np.random.default_rng(23)
    params = SecAggParams(list(range(10)), 12, 32, SEED)
    codes = random_codes(rng, params.client_ids, 12, 32)
    done = run_round(params, codes, rng=rng, before_masked=[9] if dropped else [])
    np.testing.assert_array_equal(done.result, done.expected)
    # The first t holders (0..5) include client 4: they alone give another secret.
    kind = 1 if dropped else 0
    first = [(w + 1, done.clients[w]._held[9][kind]) for w in range(6)]
    others = [(w + 1, done.clients[w]._held[9][kind]) for w in (0, 1, 2, 3, 5, 6)]
    assert lagrange_at_zero(first) != lagrange_at_zero(others)


@pytest.mark.parametrize("dropped", [False, True])
def test_wrong_shares_without_spares_are_a_named_error(dropped: bool) -> None:
    rng = np.random.default_rng(22)
    params = SecAggParams(list(range(10)), 12, 32, SEED)  # t = 6
    codes = random_codes(rng, params.client_ids, 12, 32)
    done = run_round(params, codes, rng=rng, before_masked=[9] if dropped else [], finish=False)
    request = done.server.unmask_request()
    if dropped:  # 7 hold client 9's mask key, two of them give wrong shares
        answering, wrong, message = [0, 1, 2, 3, 4, 5, 6], [3, 4], "mask key: no 6 of the 7 shares received"
    else:  # exactly 6 hold client 9's self-mask seed, one gives a wrong share
        answering, wrong, message = [0, 1, 2, 3, 4, 5, 9], [3], "self-mask: no 6 of the 6 shares received"
    for c in answering:
        answer = done.clients[c].unmask(request)
        done.server.receive_unmask(c, tamper_share(answer, 8) if c in wrong else answer)
    with pytest.raises(SecAggError, match=rf"cannot reconstruct client 9's {message} \(from clients \[0, 1, 2"):
        done.server.correction()


# ------------------------------------------------------------ malformed input --


@pytest.fixture(scope="module")
def round_messages() -> Round:
    params = SecAggParams(list(range(6)), 12, 16, SEED)
    rng = np.random.default_rng(30)
    return run_round(params, random_codes(rng, params.client_ids, 12, 16), rng=rng, finish=False)


def receivers(done: Round) -> dict[str, tuple[bytes, Callable[[bytes], Any]]]:
    """Each kind of message of ``done`` (the complete graph of clients 0..5) that
    client 2 or 3 sent or received, and a receiver in the state to parse it; a refused
    message leaves the receiver's state as it was."""
    params, zeros = done.params, np.zeros(16, np.uint64)
    fresh_server = SecAggServer(params)
    sharing_server = SecAggServer(params)
    for c in params.client_ids:
        sharing_server.receive_advertise(c, done.messages["advertise"][c])
    sharing_server.keys_for(2)
    fresh_client = SecAggClient(params, 2, random_bytes=deterministic(params.seed, 2))
    fresh_client.advertise()
    masking = run_round(params, {c: zeros for c in params.client_ids}, rng=np.random.default_rng(31), finish=False)
    request = masking.server.unmask_request()
    unmasking = run_round(params, {c: zeros for c in params.client_ids}, rng=np.random.default_rng(32), finish=False)
    unmask = unmasking.clients[3].unmask(unmasking.server.unmask_request())
    fresh_masker = run_round(params, {}, rng=np.random.default_rng(33), finish=False, before_masked=params.client_ids)
    return {
        "advertise": (done.messages["advertise"][2], lambda m: fresh_server.receive_advertise(2, m)),
        "keys": (done.messages["keys"][2], fresh_client.share_keys),
        "shares": (done.messages["shares"][2], lambda m: sharing_server.receive_shares(2, m)),
        "shares_for": (fresh_masker.server.shares_for(2), lambda m: fresh_masker.clients[2].mask(zeros, m)),
        "request": (request, masking.clients[2].unmask),
        "unmask": (unmask, lambda m: unmasking.server.receive_unmask(3, m)),
    }


KINDS = ["advertise", "keys", "shares", "shares_for", "request", "unmask"]


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_and_extended_messages_are_refused(round_messages: Round, kind: str) -> None:
    message, receive = receivers(round_messages)[kind]
    for cut in range(len(message)):
        with pytest.raises(SecAggError, match=r"truncated: need \d+ bytes for .* at offset \d+, have \d+"):
            receive(message[:cut])
    with pytest.raises(SecAggError, match="has 1 trailing bytes"):
        receive(message + b"\x00")
    receive(message)  # and the intact message is accepted afterwards


@pytest.mark.parametrize("kind", KINDS)
def test_headers_are_checked(round_messages: Round, kind: str) -> None:
    message, receive = receivers(round_messages)[kind]
    cases = [
        (b"XY" + message[2:], r"bad magic b'XY', expected b'SA'"),
        (message[:2] + b"\x02" + message[3:], r"unsupported version 2 \(this implementation reads version 1\)"),
        (
            message[:3] + bytes([message[3] % 6 + 1]) + message[4:],
            r"message type \d \(.*\) where type \d was expected",
        ),
        (message[:3] + b"\x09" + message[4:], r"message type 9 \(an unknown type\)"),
        (
            message[:4] + bytes(8) + message[12:],
            "belongs to another round or parameters: round tag 0000000000000000",
        ),
    ]
    for bad, text in cases:
        with pytest.raises(SecAggError, match=text):
            receive(bad)
    with pytest.raises(SecAggError, match="must be bytes, got str"):
        receive("not bytes")  # type: ignore[arg-type]
    receive(message)


def test_ids_in_messages_are_checked(round_messages: Round) -> None:
    msgs = receivers(round_messages)
    advertise, receive_advertise = msgs["advertise"]
    with pytest.raises(SecAggError, match="advertise message is from client 3, received as client 2"):
        receive_advertise(advertise[:12] + struct.pack("<I", 3) + advertise[16:])
    keys, share_keys = msgs["keys"]  # recipient 2, count 5, entries of 68 bytes: ids 0 1 3 4 5

    def entry_id(message: bytes, index: int, size: int, value: int, base: int = HEADER + 8) -> bytes:
        at = base + index * size
        return message[:at] + struct.pack("<I", value) + message[at + 4 :]

    with pytest.raises(SecAggError, match="client ids must ascend: neighbour id 1 is a duplicate"):
        share_keys(entry_id(keys, 2, 68, 1))
    with pytest.raises(SecAggError, match="client ids must ascend: neighbour id 0 is after 1"):
        share_keys(entry_id(entry_id(keys, 0, 68, 1), 1, 68, 0))
    with pytest.raises(SecAggError, match="neighbour id 77 is not in this round's client_ids"):
        share_keys(entry_id(keys, 4, 68, 77))
    with pytest.raises(SecAggError, match="keys message: the neighbour count 7 exceeds the 6 clients"):
        share_keys(keys[:16] + struct.pack("<I", 7) + keys[20:])
    with pytest.raises(SecAggError, match="keys message is for client 3, received as client 2"):
        share_keys(keys[:12] + struct.pack("<I", 3) + keys[16:])
    shares, receive_shares = msgs["shares"]  # sender 2, commitment, count 5, entries of 86 bytes
    with pytest.raises(SecAggError, match="recipient 4 where client 3 was expected"):
        receive_shares(entry_id(shares, 2, 86, 4, base=HEADER + 40))
    with pytest.raises(SecAggError, match="4 recipients, expected 5"):
        receive_shares(shares[: HEADER + 36] + struct.pack("<I", 4) + shares[HEADER + 40 : -86])
    unmask, receive_unmask = msgs["unmask"]  # sender 3, count 5, entries of 38 bytes: 0 1 2 4 5
    with pytest.raises(SecAggError, match="a share of client 4 where client 2 was expected"):
        receive_unmask(entry_id(unmask, 2, 38, 4))
    kind_at = HEADER + 8 + 4
    with pytest.raises(SecAggError, match="client 0's share has kind 2, expected 1"):
        receive_unmask(unmask[:kind_at] + b"\x02" + unmask[kind_at + 1 :])
    share_at = kind_at + 1
    with pytest.raises(SecAggError, match="client 0's share is not an element of the field"):
        receive_unmask(unmask[:share_at] + b"\xff" * 33 + unmask[share_at + 33 :])
    receive_unmask(unmask)
    with pytest.raises(SecAggError, match="client 3 already answered"):
        receive_unmask(unmask)


def test_advertised_keys_are_checked() -> None:
    params = SecAggParams([1, 2, 3], 12, 4, SEED, dropout_tolerance=0.0)
    server = SecAggServer(params)
    first = SecAggClient(params, 1).advertise()
    server.receive_advertise(1, first)
    with pytest.raises(SecAggError, match="client 1 already advertised"):
        server.receive_advertise(1, first)
    copy = first[:12] + struct.pack("<I", 2) + first[16:]
    with pytest.raises(SecAggError, match="client 2 advertised a public key of client 1"):
        server.receive_advertise(2, copy)
    twice = copy[:16] + copy[16:48] * 2
    with pytest.raises(SecAggError, match="client 2 advertised the same public key twice"):
        server.receive_advertise(2, twice)
    with pytest.raises(SecAggError, match="client 7 is not in this round's client_ids"):
        server.receive_advertise(7, first)


@pytest.mark.parametrize(
    "vector, message",
    [
        (np.zeros(16, np.int64), "dtype uint64, got int64"),
        (np.zeros(15, np.uint64), r"shape \(16,\), got \(15,\)"),
        (np.zeros((16, 1), np.uint64), r"shape \(16,\), got \(16, 1\)"),
        (np.full(16, 4096, np.uint64), "residues below 2\\^12: 4096 at index 0"),
        ([0] * 16, "numpy array of uint64, got list"),
    ],
)
def test_vectors_of_the_wrong_kind_are_refused(vector: Any, message: str) -> None:
    params = SecAggParams(list(range(4)), 12, 16, SEED, dropout_tolerance=0.25)
    rng = np.random.default_rng(40)
    done = run_round(params, random_codes(rng, params.client_ids, 12, 16), rng=rng, finish=False, before_masked=[3])
    forwarded = done.server.shares_for(3)
    with pytest.raises(SecAggError, match="mask before share_keys"):
        SecAggClient(params, 3).mask(np.zeros(16, np.uint64), forwarded)
    with pytest.raises(SecAggError, match="codes must .*" + message):
        done.clients[3].mask(vector, forwarded)
    with pytest.raises(SecAggError, match="client 3's masked vector must .*" + message):
        done.server.receive_masked(3, vector)
    done.server.receive_masked(3, done.clients[3].mask(np.zeros(16, np.uint64), forwarded))


# ------------------------------------------------------------------ parameters --


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"client_ids": [1]}, "at least 2 clients, got 1"),
        ({"client_ids": [3, 2]}, "sorted ascending without duplicates: 2 at position 1 is after 3"),
        ({"client_ids": [2, 2, 3]}, "2 at position 1 is a duplicate"),
        ({"client_ids": [1, 1 << 32]}, r"client id 4294967296 at position 1 is outside \[0, 2\^32 - 1\]"),
        ({"client_ids": [1, True]}, "each client id must be an integer, got a bool"),
        ({"client_ids": "ab"}, "client_ids must be a sequence of integers, got str"),
        ({"modulus_bits": 1}, r"modulus_bits must be in \[2, 62\], got 1"),
        ({"modulus_bits": 63}, r"modulus_bits must be in \[2, 62\], got 63"),
        ({"modulus_bits": 12.0}, "modulus_bits must be an integer, got float"),
        ({"length": 0}, r"length must be in \[1, 2\^32\], got 0"),
        ({"seed": bytes(31)}, "seed must be 32 bytes, got 31 bytes"),
        ({"seed": "x" * 32}, "seed must be 32 bytes, got str"),
        ({"dropout_tolerance": 1.0}, r"dropout_tolerance must be in \[0, 1\), got 1.0"),
        ({"dropout_tolerance": float("nan")}, r"dropout_tolerance must be in \[0, 1\), got nan"),
        ({"dropout_tolerance": "0.3"}, "dropout_tolerance must be a number, got str"),
        (
            {"dropout_tolerance": 0.5},
            r"dropout_tolerance 0.5 is unsafe for 10 clients in the complete graph: tolerating 5 dropouts leaves "
            r"a threshold of 4 shares, and security needs more than half of the 9 neighbours \(5 or more\); "
            "lower the tolerance$",
        ),
        (
            {"dropout_tolerance": 0.3, "degree": 4},
            "unsafe for 10 clients in a degree-4 graph: .* lower the tolerance or raise the degree",
        ),
        ({"threshold": 4}, r"threshold must be in \[5, 9\] for the complete graph .* got 4"),
        ({"threshold": 10}, r"threshold must be in \[5, 9\]"),
        ({"threshold": 7, "dropout_tolerance": 0.3}, "threshold 7 is more than the 6 shares that survive"),
        ({"degree": 5}, r"degree must be 9 \(the complete graph of 10 clients\) or an even number in \[2, 8\]"),
        ({"degree": 0}, "degree must be 9"),
        ({"degree": 9.5}, "degree must be an integer, got float"),
    ],
)
def test_parameters_are_validated(changes: dict[str, Any], message: str) -> None:
    fields = {"client_ids": list(range(10)), "modulus_bits": 12, "length": 8, "seed": SEED} | changes
    with pytest.raises(ValueError, match=message):
        SecAggParams(**fields)


def test_parameters_resolve_in_place() -> None:
    params = SecAggParams([5, 9, 11], 12, 8, SEED)
    assert (params.dropout_tolerance, params.degree, params.threshold) == (0.3, 2, 2)
    assert params.client_ids == (5, 9, 11) and params.neighbours(9) == (5, 11)
    assert dataclasses.replace(params, length=9).threshold == 2
    assert SecAggParams([1, 2, 3, 4, 5], 12, 8, SEED, threshold=3).degree == 4  # complete without a tolerance
    assert SecAggParams(list(range(10)), 12, 8, SEED, threshold=6, dropout_tolerance=0.3).threshold == 6
    with pytest.raises(TypeError, match="params must be SecAggParams"):
        SecAggServer("params")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="client 4 is not in this round's client_ids"):
        SecAggClient(params, 4)


def hypergeometric_tail(others: int, dropouts: int, degree: int, below: int) -> float:
    """P[fewer than ``below`` of ``degree`` neighbours survive], in floats (lgamma)."""

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1) if 0 <= b <= a else -math.inf

    kept = others - dropouts
    log_total = log_comb(others, degree)
    return sum(math.exp(log_comb(kept, s) + log_comb(dropouts, degree - s) - log_total) for s in range(below))


@pytest.mark.parametrize("n, tolerance", [(200, 0.1), (1000, 0.05), (1000, 0.3), (5000, 0.2)])
def test_sparse_degree_and_threshold_follow_the_documented_rule(n: int, tolerance: float) -> None:
    params = SecAggParams(list(range(n)), 12, 8, SEED, dropout_tolerance=tolerance)
    k, t, dropouts = params.k, params.t, math.floor(tolerance * n)
    budget = 2.0**-40 / n
    assert not params.complete and k % 2 == 0 and k >= 2 * math.ceil(math.log2(n)) and k <= (n - 1) / 2
    assert hypergeometric_tail(n - 1, dropouts, k, t) <= budget < hypergeometric_tail(n - 1, dropouts, k, t + 1)
    assert 2 * t > k
    smaller = k - 2
    if smaller >= 2 * math.ceil(math.log2(n)):  # the rule takes the smallest such degree
        best = max(s for s in range(smaller + 1) if hypergeometric_tail(n - 1, dropouts, smaller, s) <= budget)
        assert 2 * best <= smaller


def test_harary_graph_is_regular_symmetric_and_seeded() -> None:
    params = SecAggParams(list(range(0, 300, 3)), 12, 8, SEED, threshold=6, degree=10)
    graph = {c: set(params.neighbours(c)) for c in params.client_ids}
    assert all(len(v) == 10 and c not in v for c, v in graph.items())
    assert all(c in graph[v] for c in graph for v in graph[c])
    assert all(
        params.are_neighbours(u, v) == (v in graph[u]) for u in params.client_ids[:20] for v in params.client_ids
    )
    other = dataclasses.replace(params, seed=bytes(32))
    assert {c: set(other.neighbours(c)) for c in other.client_ids} != graph
    assert {c: set(params.neighbours(c)) for c in params.client_ids} == graph  # recomputed: the same


def survival_trials(n: int, tolerance: float, trials: int) -> tuple[int, SecAggParams]:
    """The fewest surviving neighbours any client kept over ``trials`` rounds of
    floor(tolerance * n) random dropouts."""
    params = SecAggParams(list(range(n)), 12, 8, SEED, dropout_tolerance=tolerance)
    assert not params.complete
    adjacency = np.zeros((n, n), np.int32)
    for c in range(n):
        adjacency[c, list(params.neighbours(c))] = 1
    rng = np.random.default_rng(50)
    dropouts = math.floor(tolerance * n)
    worst = params.k
    for _ in range(trials):
        alive = np.ones(n, np.int32)
        alive[rng.choice(n, dropouts, replace=False)] = 0
        worst = min(worst, int((adjacency @ alive)[alive == 1].min()))
    return worst, params


def test_sparse_neighbourhoods_survive_random_dropouts() -> None:
    """Monte Carlo of the threshold rule: with D random dropouts, every surviving client
    keeps t surviving neighbours (the rule promises failure below 2^-40 per round)."""
    worst, params = survival_trials(400, 0.2, 300)
    assert worst >= params.t, (worst, params.t, params.k)


@pytest.mark.slow
def test_sparse_neighbourhoods_survive_random_dropouts_at_scale() -> None:
    worst, params = survival_trials(2000, 0.3, 300)
    assert worst >= params.t, (worst, params.t, params.k)
