"""The PL/Python module's pure logic, tested outside PostgreSQL."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from sidecar import embedding
from sidecar.migrate import sql_dir

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pgnats", REPO / "plpython" / "pgnats.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pg = _load()


def test_embedded_copy_matches_the_source() -> None:
    target = embedding.embedding_target(sql_dir())
    embedded = embedding.extract(target.read_text())
    assert embedded == (REPO / "plpython" / "pgnats.py").read_text(), (
        f"run scripts/embed-plpython (sql/definitions/{target.name} is stale)"
    )


@pytest.mark.parametrize("subject", ["a", "a.b.c", "webhooks.orders-eu.created_1", "ünï.cødé"])
def test_valid_subjects(subject: str) -> None:
    assert pg.validate_subject(subject) == subject


@pytest.mark.parametrize("subject", ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\tb", "x" * 1025])
def test_invalid_subjects(subject: str) -> None:
    with pytest.raises(pg.InvalidSubject):
        pg.validate_subject(subject)


def test_wildcard_subjects() -> None:
    assert pg.validate_subject("a.*.c", wildcards=True)
    assert pg.validate_subject("a.>", wildcards=True)
    with pytest.raises(pg.InvalidSubject):
        pg.validate_subject("a.>.c", wildcards=True)


def test_headers() -> None:
    assert pg.normalize_headers({"X-A": "1", "X-B": 2, "X-C": ["a", "b"]}) == [
        ("X-A", "1"),
        ("X-B", "2"),
        ("X-C", "a"),
        ("X-C", "b"),
    ]
    for bad in (
        {"X-A": "a\r\nInjected: 1"},
        {"Bad Name": "v"},
        {"X:Y": "v"},
        {"X": {"nested": 1}},
        {"X": None},
    ):
        with pytest.raises(pg.InvalidHeader):
            pg.normalize_headers(bad)
    with pytest.raises(pg.InvalidHeader):
        pg.normalize_headers(["not", "a", "dict"])


def test_redact_headers() -> None:
    redacted = pg.redact_headers(
        {"Authorization": "Bearer x", "X-Api-Key": "k", "X-Trace": "t", "Cookie": "c"}
    )
    assert redacted == {"Authorization": "***", "X-Api-Key": "***", "X-Trace": "t", "Cookie": "***"}


def test_encode_pub_and_hpub() -> None:
    assert pg.encode_pub("a.b", "_INBOX.1", b"hi") == b"PUB a.b _INBOX.1 2\r\nhi\r\n"
    frame = pg.encode_pub("a.b", "r", b"hi", [("Nats-Msg-Id", "x")])
    hdr = b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n"
    assert frame == b"HPUB a.b r %d %d\r\n" % (len(hdr), len(hdr) + 2) + hdr + b"hi\r\n"


def test_parser_handles_split_frames_and_control_lines() -> None:
    p = pg.Parser()
    assert p.feed(b'INFO {"max_payload": 1048576}\r\nPI') == [("INFO", {"max_payload": 1048576})]
    assert p.feed(b"NG\r\nMSG a.b 1 r 5\r\nhel") == [("PING",)]
    hdr = b"NATS/1.0 503\r\n\r\n"
    ops = p.feed(b"lo\r\n+OK\r\nHMSG _I.1 1 %d %d\r\n" % (len(hdr), len(hdr)) + hdr + b"\r\n-ERR 'Bad'\r\n")
    assert ops == [
        ("MSG", "a.b", "1", "r", None, b"hello"),
        ("MSG", "_I.1", "1", "", hdr, b""),
        ("ERR", "Bad"),
    ]
    with pytest.raises(pg.ProtocolError):
        pg.Parser().feed(b"WHAT\r\n")


def test_pub_ack() -> None:
    assert pg.parse_pub_ack(None, b'{"stream":"S","seq":3}', "a") == {
        "stream": "S",
        "seq": 3,
        "duplicate": False,
    }
    assert pg.parse_pub_ack(None, b'{"stream":"S","seq":3,"duplicate":true}', "a")["duplicate"] is True
    with pytest.raises(pg.NoStream):
        pg.parse_pub_ack(b"NATS/1.0 503\r\n\r\n", b"", "a")
    with pytest.raises(pg.PayloadTooLarge):
        pg.parse_pub_ack(
            None,
            b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}',
            "a",
        )
    with pytest.raises(pg.ServerError, match="err_code 10077"):
        pg.parse_pub_ack(
            None, b'{"error":{"code":503,"err_code":10077,"description":"resource limits exceeded"}}', "a"
        )


def test_envelope_keeps_data_bytes_and_carries_no_secrets() -> None:
    data = '{"z": 1, "a": 123456789012345678901234567890, "s": "it\'s \\"q\\""}'
    env = pg.build_envelope("https://h/x", data, webhook_id=5, event_id="e1", timestamp=1700000000)
    assert env == (
        '{"webhook_url":"https://h/x","data":' + data + ',"headers":{},"webhook_id":5,"event_id":"e1",'
        '"timestamp":1700000000}'
    )
    assert json.loads(env)["data"]["a"] == 123456789012345678901234567890
    with pytest.raises(ValueError):
        pg.build_envelope("https://h/x", "{not json")


def test_ed25519_rfc8032_vector_1() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    assert (
        pg.ed25519_public_key(seed).hex()
        == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert pg.ed25519_sign(seed, b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
        "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_nkey_seed_round_trip_and_checks() -> None:
    seed32 = bytes(range(32))
    text = pg.encode_user_seed(seed32)
    assert text.startswith("SU")
    assert pg.decode_user_seed(text) == seed32
    assert pg.user_public_key(seed32).startswith("U")
    broken = text[:-1] + ("A" if text[-1] != "A" else "B")
    with pytest.raises(pg.AuthFailed):
        pg.decode_user_seed(broken)
    pub, sig = pg.sign_nonce(text, "nonce-123")
    assert pub == pg.user_public_key(seed32) and len(sig) == 86


def test_parse_creds() -> None:
    text = (
        "-----BEGIN NATS USER JWT-----\neyJhbGc.jwt.sig\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "-----BEGIN USER NKEY SEED-----\nSUAXYZ\n------END USER NKEY SEED------\n"
    )
    assert pg.parse_creds(text) == ("eyJhbGc.jwt.sig", "SUAXYZ")
    with pytest.raises(pg.AuthFailed):
        pg.parse_creds("nothing here")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://localhost:4222", ("nats", "localhost", 4222)),
        ("tls://h", ("tls", "h", 4222)),
        ("nats://[::1]:5000", ("nats", "::1", 5000)),
    ],
)
def test_parse_server_url(url: str, expected: tuple[str, str, int]) -> None:
    assert pg.parse_server_url(url) == expected


def test_embedding_round_trip() -> None:
    text = f"head\n{embedding.BEGIN}\nold\n{embedding.END}\ntail\n"
    out = embedding.embed(text, "print('x')\n")
    assert embedding.extract(out) == "print('x')\n"
    assert out.startswith("head\n") and out.endswith(f"{embedding.END}\ntail\n")
    with pytest.raises(ValueError):
        embedding.embed(text, "s = '$pgnats$'")
