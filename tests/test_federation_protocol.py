"""fedpress.federation protocol, accounting and model arithmetic, without sockets.

Frame headers here are built by hand from the documented layout
(magic b"FP" | version u8 | type u8 | length u32 LE), not with encode_frame.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct

import fedpress as fp
import numpy as np
import pytest
from fedpress.federation import model as M
from fedpress.federation import protocol as P
from fedpress.federation.accounting import Ledger


def header(ftype: int, length: int, *, magic: bytes = b"FP", version: int = P.PROTOCOL_VERSION) -> bytes:
    return struct.pack("<2sBBI", magic, version, ftype, length)


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()  # inside a running loop
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def read(data: bytes, limit: int = 1 << 20) -> P.Frame:
    async def go() -> P.Frame:
        return await P.read_frame(feed(data), limit)

    return asyncio.run(go())


def test_frame_layout_matches_the_documented_header():
    parts = P.encode_frame(P.FrameType.BYE, b"done")
    assert b"".join(parts) == header(8, 4) + b"done"
    assert P.HEADER.size == 8
    assert [t.value for t in P.FrameType] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    frame = read(header(7, 6) + struct.pack("<H", 3) + b"nope")
    assert frame.type == P.FrameType.ERROR
    assert P.unpack_error(frame.body) == (3, "nope")


def test_secagg_frames_round_trip_and_refuse_unknown_steps():
    body = b"".join(P.SecAgg(7, P.SecAggStep.SHARES, b"message").parts())
    assert body == struct.pack("<IB", 7, 3) + b"message"
    assert P.SecAgg.unpack(body) == P.SecAgg(7, P.SecAggStep.SHARES, b"message")
    with pytest.raises(P.ProtocolError, match="unknown step 9"):
        P.SecAgg.unpack(struct.pack("<IB", 7, 9))
    with pytest.raises(P.ProtocolError):
        P.SecAgg.unpack(b"\x01\x00")


@pytest.mark.parametrize(
    "data, code",
    [
        (b"GET / HTTP/1.1\r\n", P.ErrorCode.PROTOCOL),  # bad magic
        (header(1, 0, version=1), P.ErrorCode.VERSION),  # another protocol version
        (header(99, 0), P.ErrorCode.PROTOCOL),  # unknown frame type
        (header(1, 0xFFFFFFFF), P.ErrorCode.TOO_LARGE),  # oversized: no body follows
    ],
)
def test_bad_headers_fail_before_the_body_is_read(data, code):
    with pytest.raises(P.ProtocolError) as info:
        read(data, limit=1024)
    assert info.value.code == code


def test_oversized_length_is_refused_without_reading_the_body():
    async def go() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(header(6, 2048))  # the body never arrives: the error must not wait for it
        await asyncio.wait_for(P.read_frame(reader, 1024), 1.0)

    with pytest.raises(P.FrameTooLarge) as info:
        asyncio.run(go())
    assert (info.value.length, info.value.limit) == (2048, 1024)


def test_eof_is_connection_closed():
    with pytest.raises(P.ConnectionClosed):
        read(b"")
    with pytest.raises(P.ConnectionClosed):
        read(header(8, 10) + b"abc")


def test_hello_roundtrip_and_checks():
    tag = bytes(range(16))
    h = P.Hello("site-1", ("downlink-delta",), tag, "topk:0.01+q4")
    body = h.pack()
    assert body[:2] == struct.pack("<H", P.PROTOCOL_VERSION) and body[2:4] == struct.pack("<H", 6)
    assert body[4:10] == b"site-1"
    assert P.Hello.unpack(body) == h
    with pytest.raises(P.ProtocolError) as info:
        P.Hello.unpack(struct.pack("<H", 99) + body[2:])
    assert info.value.code == P.ErrorCode.VERSION
    head = struct.pack("<HH", P.PROTOCOL_VERSION, 1)
    for bad in [
        struct.pack("<HH", P.PROTOCOL_VERSION, 50) + b"short",
        head + b"\x00{}",
        head + b"a[1]",
        head + b'a{"model":"zz"}',
    ]:
        with pytest.raises(P.ProtocolError):
            P.Hello.unpack(bad)
    with pytest.raises(ValueError):
        P.check_client_id("")
    with pytest.raises(ValueError):
        P.check_client_id("x" * 200)


def test_task_and_update_roundtrip():
    payloads = [b"abc", b"", b"0123456789"]
    task = P.Task(7, P.TASK_DELTA, b"T" * 16, b"B" * 16, {"lr": 0.1}, payloads)
    body = b"".join(bytes(p) for p in task.parts())
    back = P.Task.unpack(body)
    assert (back.round, back.kind, back.model_tag, back.base_tag, back.config) == (
        7,
        1,
        b"T" * 16,
        b"B" * 16,
        {"lr": 0.1},
    )
    assert [bytes(p) for p in back.payloads] == payloads and task.payload_bytes == 13
    with pytest.raises(P.ProtocolError):
        P.Task.unpack(body[:-1])
    with pytest.raises(P.ProtocolError):
        P.Task.unpack(body + b"x")
    up = P.Update(3, 120, {"loss": 0.5, "n": np.float32(2.0)}, b"payload")
    body = b"".join(bytes(p) for p in up.parts())
    assert body[:4] == struct.pack("<I", 3) and body[4] == 0 and body[5:13] == struct.pack("<Q", 120)
    back = P.Update.unpack(body)
    assert (back.round, back.num_examples, back.metrics, bytes(back.payload)) == (
        3,
        120,
        {"loss": 0.5, "n": 2.0},
        b"payload",
    )
    # Strict JSON: NaN becomes null on the way out and is refused on the way in.
    assert P.Update.unpack(b"".join(bytes(p) for p in P.Update(1, 1, {"x": float("nan")}, b"").parts())).metrics == {
        "x": None
    }
    bad = struct.pack("<IBQI", 1, 0, 1, 5) + b"[NaN]"
    with pytest.raises(P.ProtocolError):
        P.Update.unpack(bad)


def test_macs_are_hmac_sha256_with_distinct_labels():
    token, sn, cn = b"secret", b"s" * 32, b"c" * 32
    idf = struct.pack("<H", 2) + b"id"
    assert (
        P.client_mac(token, sn, cn, "id")
        == hmac.new(token, b"fedpress-auth-client-v1" + sn + cn + idf, hashlib.sha256).digest()
    )
    assert (
        P.server_mac(token, cn, sn, "id")
        == hmac.new(token, b"fedpress-auth-server-v1" + cn + sn + idf, hashlib.sha256).digest()
    )
    assert P.client_mac(token, sn, cn, "id") != P.server_mac(token, sn, cn, "id")
    assert P.client_mac(token, sn, cn, "id") != P.client_mac(b"other", sn, cn, "id")
    with pytest.raises(ValueError):
        P.as_token(b"")


def test_ledger_routes_pending_bytes_on_the_decision():
    ledger = Ledger()
    a, b = ledger.account(), ledger.account()
    a("rx", 10)
    a("tx", 5)
    b("rx", 7)
    a.admit("c1")
    a("rx", 1)
    a.payload("rx", 100)
    b.reject()
    b("tx", 3)
    b.reject()  # counted once
    row = ledger.row.totals()
    assert row["uplink_wire_bytes"] == 11 and row["downlink_wire_bytes"] == 5 and row["uplink_payload_bytes"] == 100
    assert (row["rejected_connections"], row["rejected_uplink_wire_bytes"], row["rejected_downlink_wire_bytes"]) == (
        1,
        7,
        3,
    )
    ledger.start_row(1)
    a("tx", 4)
    assert ledger.row.totals()["client_bytes"]["c1"]["downlink_wire_bytes"] == 4


def test_update_arithmetic():
    g = {
        "w": np.array([1.0, 2.0], np.float32),
        "h": np.array([1.0], np.float16),
        "steps": np.array(10, np.int64),
        "mask": np.array([True, False]),
    }
    mean = {
        "w": np.array([0.5, -1.0], np.float32),
        "h": np.array([2.0], np.float16),
        "steps": np.array(3, np.int64),
        "mask": np.array([False, False]),
    }
    new = M.apply_update(g, mean, 0.5)
    assert new["w"].tolist() == [1.25, 1.5] and new["w"].dtype == np.float32
    assert new["h"].dtype == np.float16 and float(new["h"][0]) == 2.0
    assert int(new["steps"]) == 13 and new["mask"].tolist() == [False, False]
    aligned = M.align_update({"w": np.array([1, 2], np.float64), "steps": np.float64(2.6)}, g)
    assert list(aligned) == list(g)
    assert aligned["w"].dtype == np.float32 and aligned["h"].tolist() == [0.0]
    assert int(aligned["steps"]) == 3 and aligned["mask"].tolist() == [True, False]
    with pytest.raises(ValueError):
        M.align_update({"nope": np.zeros(1)}, g)
    with pytest.raises(ValueError):
        M.align_update({"w": np.zeros(3)}, g)


def test_aggregator_reference_rejects_foreign_tables():
    g = {"w": np.zeros(4, np.float32), "n": np.zeros((), np.int64)}
    agg = fp.Aggregator()
    agg.add(M.zero_reference(g), 0.0)
    with pytest.raises(fp.DecodeError):
        agg.add(fp.Codec("fp32").encode({"w": np.ones(5, np.float32), "n": np.zeros((), np.int64)}), 1.0)
    agg.add(
        fp.Codec("topk:0.5+fp16").encode({"w": np.array([4, 0, 0, -2], np.float32), "n": np.array(2, np.int64)}), 2.0
    )
    out = agg.result()
    assert out["w"].tolist() == [4, 0, 0, -2] and int(out["n"]) == 2


def test_downlink_chain_is_bit_exact():
    rng = np.random.default_rng(0)
    params = {
        "w": rng.standard_normal(300).astype(np.float32),
        "d": rng.standard_normal(5),
        "k": np.array([1, 2], np.int32),
    }
    dl = M.Downlink("topk:0.1+fp16", params, history=3)
    client = M.decode_params(dl.full())
    held = dl.tag
    for step in range(5):
        params = {
            "w": params["w"] + rng.standard_normal(300).astype(np.float32) * 0.1,
            "d": params["d"] + 0.01,
            "k": params["k"] + 1,
        }
        dl.advance(params)
        if step == 1:  # the client catches up on a chain of two deltas
            kind, base, payloads = dl.plan(held, True)
            assert kind == "delta" and base == held and len(payloads) == 2
            for p in payloads:
                client = M.apply_downlink_delta(client, fp.decode(p))
            held = dl.tag
            for k in params:
                assert client[k].dtype == dl.replica[k].dtype
                assert np.array_equal(client[k], dl.replica[k]), k
    assert dl.plan(held, True)[0] == "delta" and len(dl.chain) == 3
    assert dl.plan(None, True)[0] == "full" and dl.plan(held, False)[0] == "full"
    assert dl.plan(dl.tag, True) == ("delta", dl.tag, [])
    full = M.decode_params(dl.full())
    assert all(np.array_equal(full[k], dl.replica[k]) for k in params)


def test_import_boundaries():
    """``import fedpress`` does not import the federation package; the federation
    package does not import torch."""
    import subprocess
    import sys

    code = (
        "import sys, fedpress; assert 'fedpress.federation' not in sys.modules; "
        "import fedpress.federation; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_constructor_checks(tmp_path):
    from fedpress.federation import Client, Server, parse_address

    params = {"w": np.zeros(3, np.float32)}
    ok = dict(rounds=1, clients_per_round=2, token=b"t", insecure=True)
    Server("127.0.0.1", 0, params, **ok)
    with pytest.raises(ValueError, match="no TLS"):  # TLS unless plain TCP is asked for
        Server("127.0.0.1", 0, params, rounds=1, clients_per_round=2, token=b"t")
    with pytest.raises(ValueError, match="no TLS"):
        Client("h:1", b"t", lambda p, c: None)
    for bad in [
        dict(token=None),
        dict(token=b""),
        dict(min_fit=3),
        dict(rounds=0),
        dict(codec="topk"),
        dict(downlink="nope"),
        dict(resume=True),
        dict(round_timeout=0),
        dict(max_frame_bytes=1 << 33),
    ]:
        with pytest.raises((ValueError, TypeError)):
            Server("127.0.0.1", 0, params, **{**ok, **bad})
    with pytest.raises(TypeError):
        Server("127.0.0.1", 0, {}, **ok)
    assert parse_address("example.org:8080") == ("example.org", 8080)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad_address in ["nohost", ":80", "h:0", "h:x", "h:70000"]:
        with pytest.raises(ValueError):
            parse_address(bad_address)
    with pytest.raises(ValueError):
        Client("h:1", b"t", lambda p, c: None, codec="bogus", insecure=True)
    with pytest.raises(ValueError):
        Client("h:1", b"t", lambda p, c: None, client_id="bad\nid", insecure=True)


def test_checkpoint_roundtrip(tmp_path):
    params = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(4, np.int64)}
    dl = M.Downlink("topk:0.5+fp16", params)
    dl.advance({"a.weight": params["a.weight"] + 1, "n": params["n"]})
    M.save_checkpoint(tmp_path, 3, params, {"x": 1}, dl)
    M.save_checkpoint(tmp_path, 4, params, {"x": 2}, dl)
    meta, back, arrays = M.load_checkpoint(tmp_path)
    assert meta["round"] == 4 and meta["x"] == 2 and list(back) == list(params)
    assert all(np.array_equal(back[k], params[k]) and back[k].dtype == params[k].dtype for k in params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000004.npz", "checkpoint.json"]
    other = M.Downlink("topk:0.5+fp16", params)
    other.restore(meta["downlink"], arrays, list(params))
    assert other.tag == dl.tag and [c[2] for c in other.chain] == [c[2] for c in dl.chain]
    assert all(np.array_equal(other.replica[k], dl.replica[k]) for k in params)
    assert M.load_checkpoint(tmp_path / "missing") is None


class _FakeSocketTransport(asyncio.Transport):
    """Stands in for a socket transport: records writes, reports a fixed backlog."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.backlog = 0
        self.aborted = False

    def write(self, data) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


def test_counting_layer_counts_both_ways_and_unsent_bytes_are_returned():
    from fedpress.federation.transport import CountingProtocol

    async def go() -> None:
        seen = []
        shim = CountingProtocol()
        raw = _FakeSocketTransport()
        shim.connection_made(raw)
        assert raw.reading is False  # nothing reaches an upper protocol before it exists
        counting = shim.transport
        counting.on_bytes = lambda d, n: seen.append((d, n))
        buf = shim.get_buffer(-1)
        buf[:5] = b"early"
        shim.buffer_updated(5)  # arrives before the upper protocol (possible on older Pythons)
        reader = asyncio.StreamReader()
        upper = asyncio.StreamReaderProtocol(reader)
        counting.set_protocol(upper)
        upper.connection_made(counting)
        counting.resume_reading()
        buf = shim.get_buffer(-1)
        buf[:4] = b"late"
        shim.buffer_updated(4)
        assert await reader.readexactly(9) == b"earlylate"
        counting.write(b"abc")
        counting.writelines([b"de", memoryview(b"fgh")])
        assert bytes(raw.written) == b"abcdefgh" and (counting.rx, counting.tx) == (9, 8)
        raw.backlog = 3  # three bytes never left: an abort gives them back
        counting.abort()
        assert raw.aborted and counting.tx == 5
        assert seen == [("rx", 5), ("rx", 4), ("tx", 3), ("tx", 2), ("tx", 3), ("tx", -3)]
        shim.connection_lost(None)
        assert counting.closed.done()

    asyncio.run(go())


# ------------------------------------------------------------------ sealing --
def sealed(sealer: P.FrameSealer, ftype: int, body: bytes) -> P.Frame:
    """What a receiver's read_frame returns for one sealed frame."""
    data = b"".join(bytes(p) for p in sealer.seal(ftype, body))
    return read(data)


def keys(**change: object) -> tuple[bytes, bytes]:
    args = dict(
        token=b"t" * 32,
        server_nonce=b"s" * 32,
        client_nonce=b"c" * 32,
        client_id="site-1",
        hello_body=b"hello",
        welcome_body=b"welcome",
    )
    args.update(change)
    return P.session_keys(**args)  # type: ignore[arg-type]


def test_session_keys_depend_on_everything_the_handshake_fixed():
    c2s, s2c = keys()
    assert len(c2s) == len(s2c) == 32 and c2s != s2c
    for change in [
        dict(token=b"u" * 32),
        dict(server_nonce=b"S" * 32),
        dict(client_nonce=b"C" * 32),
        dict(client_id="site-2"),
        dict(hello_body=b"hellO"),
        dict(welcome_body=b"welcomE"),
    ]:
        other = keys(**change)
        assert other[0] != c2s and other[1] != s2c, change


def test_sealed_frames_round_trip_and_count_their_tag():
    c2s, _ = keys()
    sealer, opener = P.FrameSealer(c2s), P.FrameOpener(c2s)
    for i, body in enumerate([b"", b"x", b"update" * 1000]):
        frame = sealed(sealer, P.FrameType.UPDATE, body)
        assert len(frame.body) == len(body) + P.TRAILER_BYTES
        assert opener.open(frame) == P.Frame(P.FrameType.UPDATE, body)
        assert opener.seq == i + 1


@pytest.mark.parametrize(
    "attack",
    ["flip_body", "flip_tag", "retype", "truncate", "other_key", "other_dir", "replay", "reorder", "drop", "short"],
)
def test_tampered_replayed_or_reordered_frames_are_rejected(attack):
    c2s, s2c = keys()
    sealer, opener = P.FrameSealer(c2s), P.FrameOpener(c2s)
    first = sealed(sealer, P.FrameType.UPDATE, b"first update")
    second = sealed(sealer, P.FrameType.UPDATE, b"second update")
    if attack == "replay":
        opener.open(first)
        bad = first
    elif attack in ("reorder", "drop"):
        bad = second
    elif attack == "flip_body":
        bad = P.Frame(first.type, bytes([first.body[0] ^ 1]) + first.body[1:])
    elif attack == "flip_tag":
        bad = P.Frame(first.type, first.body[:-1] + bytes([first.body[-1] ^ 0x80]))
    elif attack == "retype":
        bad = P.Frame(P.FrameType.BYE, first.body)
    elif attack == "truncate":
        bad = P.Frame(first.type, first.body[1:])
    elif attack == "other_key":
        bad = sealed(P.FrameSealer(keys(client_id="site-2")[0]), P.FrameType.UPDATE, b"first update")
    elif attack == "other_dir":
        bad = sealed(P.FrameSealer(s2c), P.FrameType.UPDATE, b"first update")
    else:
        bad = P.Frame(first.type, b"\x00" * (P.TRAILER_BYTES - 1))
    with pytest.raises(P.ProtocolError) as info:
        opener.open(bad)
    assert info.value.code == P.ErrorCode.INTEGRITY


def test_client_tokens_are_per_id_and_need_the_master():
    master = b"m" * 32
    a, b = P.client_token(master, "site-1"), P.client_token(master, "site-2")
    assert len(a) == 64 and int(a, 16) >= 0 and a != b and a == P.client_token(master.decode(), "site-1")
    assert P.client_token(b"n" * 32, "site-1") != a
    with pytest.raises(ValueError):
        P.client_token(master, "")


@pytest.mark.parametrize("depth", [33, 5_000, 200_000])
def test_deeply_nested_json_is_a_protocol_error(depth):
    data = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(P.ProtocolError, match="nested"):
        P.loads_json(data, "HELLO", limit=len(data))
    hello = struct.pack("<HH", P.PROTOCOL_VERSION, 1) + b"a" + data[: P.MAX_JSON_BYTES]
    with pytest.raises(P.ProtocolError):
        P.Hello.unpack(hello)


@pytest.mark.parametrize("text", ["1e400", "-1e400", "[1e999]"])
def test_json_numbers_beyond_float_range_are_refused(text):
    # json would read them as inf, which dumps_json cannot write back (strict JSON)
    with pytest.raises(P.ProtocolError, match="out of the float range"):
        P.loads_json(('{"x": %s}' % text).encode(), "test")
    assert P.loads_json(b'{"x": 1.5e300}', "test") == {"x": 1.5e300}


@pytest.mark.parametrize("pack", [P.pack_text, lambda t: P.pack_error(1, t)[2:]])
def test_long_texts_are_cut_between_utf8_characters(pack):
    for prefix in range(4):  # the cut falls inside a 4-byte character at every offset
        raw = pack("a" * prefix + "\N{GRINNING FACE}" * 2000)
        assert 4093 <= len(raw) <= P.MAX_TEXT_BYTES
        raw.decode("utf-8")  # strict: no half character at the end
    assert pack("short é") == "short é".encode()


def test_a_failed_update_carries_no_payload():
    good = b"".join(bytes(p) for p in P.Update(3, 0, {"error": "x"}, b"", P.UPDATE_FAILED).parts())
    assert P.Update.unpack(good).status == P.UPDATE_FAILED
    bad = b"".join(bytes(p) for p in P.Update(3, 0, {"error": "x"}, b"\x01\x02", P.UPDATE_FAILED).parts())
    with pytest.raises(P.ProtocolError, match="failed update carries 2 payload bytes"):
        P.Update.unpack(bad)
