"""kvmstub._sevcrypto, the simulated SEV hardware's per-page crypto in native code, is held
to the reference in Python: `memory.xts_encrypt` / `xts_decrypt` (AES-256-XTS through
`cryptography`) and `sev_crypto.seal_packet` / `open_packet` (AES-128-CTR and HMAC-SHA256
laid out as the reference's section 1.5 says). Same bytes for any key, tweak, IV and length;
every bad argument refused with an exception, never a crash."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmstub import _sevcrypto, sev_crypto
from kvmstub.memory import xts_decrypt, xts_encrypt
from kvmstub.uapi import PAGE_SIZE

veks = st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:])
keys16 = st.binary(min_size=16, max_size=16)
gpas = st.integers(min_value=0, max_value=(1 << 52) - 1).map(lambda n: n * PAGE_SIZE)


@settings(max_examples=200, deadline=None)
@given(vek=veks, gpa=gpas, data=st.binary(min_size=16, max_size=2 * PAGE_SIZE + 7))
def test_xts_is_the_reference_for_any_vek_tweak_and_length(
    vek: bytes, gpa: int, data: bytes
) -> None:
    key = _sevcrypto.XtsKey(vek)
    tweak = gpa.to_bytes(16, "little")
    sealed = key.encrypt(tweak, data)
    assert sealed == xts_encrypt(vek, gpa, data)
    assert key.decrypt(tweak, sealed) == data == xts_decrypt(vek, gpa, sealed)


def test_xts_calls_in_any_order_do_not_disturb_each_other() -> None:
    """One key, pages at many tweaks encrypted and decrypted interleaved (each call sets
    its own tweak), and from bytes, bytearray and memoryview alike."""
    vek = os.urandom(64)
    key = _sevcrypto.XtsKey(vek)
    pages = {gpa: os.urandom(PAGE_SIZE) for gpa in range(0, 16 * PAGE_SIZE, PAGE_SIZE)}
    sealed = {}
    for gpa, page in pages.items():
        sealed[gpa] = key.encrypt(gpa.to_bytes(16, "little"), bytearray(page))
        key.decrypt(bytes(16), os.urandom(48))  # another tweak in between
    for gpa, page in reversed(pages.items()):
        tweak = memoryview(gpa.to_bytes(16, "little"))
        assert sealed[gpa] == xts_encrypt(vek, gpa, page)
        assert key.decrypt(tweak, memoryview(sealed[gpa])) == page


@settings(max_examples=200, deadline=None)
@given(
    tek=keys16,
    tik=keys16,
    iv=keys16,
    plaintext=st.binary(max_size=PAGE_SIZE + 33),
)
def test_a_packet_is_sealed_as_the_reference_seals_it(
    tek: bytes, tik: bytes, iv: bytes, plaintext: bytes
) -> None:
    keys = _sevcrypto.PacketKeys(tek, tik)
    header, ciphertext = keys.seal(iv, plaintext)
    assert (header, ciphertext) == sev_crypto.seal_packet(tek, tik, plaintext, iv)
    fields = sev_crypto.PacketHeader.unpack(header)
    assert keys.open(fields.flags, fields.iv, fields.mac, ciphertext) == plaintext
    assert sev_crypto.open_packet(tek, tik, fields, ciphertext) == plaintext


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_changed_field_or_byte_fails_the_mac(data: st.DataObject) -> None:
    """A packet with one bit changed anywhere (flags, IV, MAC, ciphertext) opens to None,
    the caller's BadMac, as the reference refuses it."""
    tek, tik = os.urandom(16), os.urandom(16)
    keys = _sevcrypto.PacketKeys(tek, tik)
    header, ciphertext = keys.seal(os.urandom(16), os.urandom(data.draw(st.integers(1, 300))))
    fields = sev_crypto.PacketHeader.unpack(header)
    where = data.draw(st.sampled_from(["flags", "iv", "mac", "ciphertext"]))
    flags, iv, mac, ct = (
        fields.flags,
        bytearray(fields.iv),
        bytearray(fields.mac),
        bytearray(ciphertext),
    )
    if where == "flags":
        flags ^= 1 << data.draw(st.integers(0, 31))
    else:
        buf = {"iv": iv, "mac": mac, "ciphertext": ct}[where]
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    assert keys.open(flags, bytes(iv), bytes(mac), bytes(ct)) is None
    with pytest.raises(sev_crypto.BadMac):
        sev_crypto.open_packet(
            tek, tik, sev_crypto.PacketHeader(flags, bytes(iv), bytes(mac)), bytes(ct)
        )


def test_a_packet_under_other_keys_fails_the_mac() -> None:
    header, ciphertext = _sevcrypto.PacketKeys(b"E" * 16, b"M" * 16).seal(b"I" * 16, bytes(64))
    fields = sev_crypto.PacketHeader.unpack(header)
    other_tik = _sevcrypto.PacketKeys(b"E" * 16, b"N" * 16)
    assert other_tik.open(fields.flags, fields.iv, fields.mac, ciphertext) is None


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: _sevcrypto.XtsKey(bytes(63)), ValueError, "64"),
        (lambda: _sevcrypto.XtsKey(bytes(32) * 2), ValueError, "duplicated keys"),
        (lambda: _sevcrypto.XtsKey("x" * 64), TypeError, ""),
        (lambda: _sevcrypto.XtsKey(), TypeError, ""),
        (lambda: _sevcrypto.XtsKey(os.urandom(64), vek=1), TypeError, ""),
        (
            lambda: _sevcrypto.XtsKey(os.urandom(64)).encrypt(bytes(15), bytes(16)),
            ValueError,
            "tweak",
        ),
        (
            lambda: _sevcrypto.XtsKey(os.urandom(64)).encrypt(bytes(16), bytes(15)),
            ValueError,
            "16-byte",
        ),
        (lambda: _sevcrypto.XtsKey(os.urandom(64)).decrypt(bytes(16)), TypeError, ""),
        (lambda: _sevcrypto.XtsKey(os.urandom(64)).decrypt(bytes(16), 5), TypeError, ""),
        (
            lambda: _sevcrypto.XtsKey.__new__(_sevcrypto.XtsKey).encrypt(bytes(16), bytes(16)),
            ValueError,
            "not keyed",
        ),
        (lambda: _sevcrypto.PacketKeys(bytes(16)), TypeError, ""),
        (lambda: _sevcrypto.PacketKeys(bytes(15), bytes(16)), ValueError, "TEK"),
        (lambda: _sevcrypto.PacketKeys(bytes(16), bytes(17)), ValueError, "TIK"),
        (lambda: _sevcrypto.PacketKeys(bytes(16), bytes(16)).seal(bytes(8), b""), ValueError, "IV"),
        (lambda: _sevcrypto.PacketKeys(bytes(16), bytes(16)).seal(bytes(16)), TypeError, ""),
        (
            lambda: _sevcrypto.PacketKeys(bytes(16), bytes(16)).open(0, bytes(16), bytes(31), b""),
            ValueError,
            "MAC",
        ),
        (
            lambda: _sevcrypto.PacketKeys(bytes(16), bytes(16)).open(
                1 << 32, bytes(16), bytes(32), b""
            ),
            OverflowError,
            "",
        ),
        (
            lambda: _sevcrypto.PacketKeys(bytes(16), bytes(16)).open(-1, bytes(16), bytes(32), b""),
            OverflowError,
            "",
        ),
        (
            lambda: _sevcrypto.PacketKeys(bytes(16), bytes(16)).open(
                "0", bytes(16), bytes(32), b""
            ),
            TypeError,
            "",
        ),
        (
            lambda: _sevcrypto.PacketKeys.__new__(_sevcrypto.PacketKeys).seal(bytes(16), b""),
            ValueError,
            "unkeyed",
        ),
    ],
)
def test_bad_arguments_are_refused_not_crashed_on(
    call: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words or None):
        call()


def test_a_key_object_is_keyed_once() -> None:
    key = _sevcrypto.XtsKey(os.urandom(64))
    with pytest.raises(TypeError, match="keyed once"):
        key.__init__(os.urandom(64))  # type: ignore[misc]
    keys = _sevcrypto.PacketKeys(bytes(16), bytes(16))
    with pytest.raises(TypeError, match="keyed once"):
        keys.__init__(bytes(16), bytes(16))  # type: ignore[misc]
