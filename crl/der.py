"""Hand-written DER for the revokedCertificates of a CRL (RFC 5280 §5.1.2.6, §5.3).

Why by hand: building the entries through ``cryptography`` (one ``RevokedCertificate`` object
per entry, then the builder) was measured at 4–12 µs per entry on this machine, which put a
1M-entry CRL about level with ``openssl ca -gencrl`` (bench/results-crl.md). Each entry here is
a few bytes objects joined straight into one buffer (~1 µs): linear, and no per-entry object
survives.

Only the entries are written here. The rest of the TBSCertList (version, signature algorithm,
issuer, dates, AKI, CRL number) comes from ``cryptography``'s own builder, and the tests check
that the result is the same CRL as ``cryptography`` builds for the same entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from mmap import mmap

# CRLReason codes (RFC 5280 §5.3.1); "unspecified" is never written (§5.3.1: SHOULD be absent).
REASON_CODES: dict[str, int] = {
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    "removeFromCRL": 8,
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}
# Extension ::= SEQUENCE { extnID id-ce-cRLReasons, extnValue OCTET STRING { ENUMERATED } } (non-critical)
_REASON_EXTENSION: dict[str, bytes] = {
    name: bytes.fromhex("300a0603551d1504030a01") + bytes([code]) for name, code in REASON_CODES.items()
}
_EXTENSIONS_OF_REASON: dict[str | None, bytes] = {None: b"", "unspecified": b"", **_REASON_EXTENSION}
# Extension ::= SEQUENCE { extnID id-ce-invalidityDate, extnValue OCTET STRING { GeneralizedTime } }
_INVALIDITY_PREFIX = bytes.fromhex("30180603551d180411180f")
_SHORT_LENGTH = [bytes((n,)) for n in range(0x80)]


def length(n: int) -> bytes:
    """DER length octets (short form below 128, else long form)."""
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + length(len(content)) + content


def utc_digits(moment: datetime) -> str:
    """``YYYYMMDDHHMMSS`` in UTC (naive means UTC); fractions of a second are dropped, as
    ``cryptography`` drops them."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return "%04d%02d%02d%02d%02d%02d" % (  # noqa: UP031 - measured faster than strftime or f-strings
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
    )


def serial_hex(serial: int) -> str:
    if serial <= 0 or serial.bit_length() > 159:
        raise ValueError(f"a certificate serial number is positive and at most 20 octets (RFC 5280), not {serial}")
    return format(serial, "X")


# One entry: serial (int, or hex text without leading zeros as the store keeps it), revocation
# time (datetime, or UTC text: the 14 digits "YYYYMMDDHHMMSS" the publisher's query hands out, or
# "YYYY-MM-DD HH:MM:SS" with anything after the seconds ignored), RFC 5280 reason name or None,
# invalidity date (same forms) or None.
Entry = tuple[int | str, datetime | str, str | None, datetime | str | None]


def _der_time_digits(value: datetime | str, what: str) -> bytes:
    """The 14 ASCII digits ``YYYYMMDDHHMMSS`` (UTC) of a time in any of ``Entry``'s forms."""
    if type(value) is str:
        digits = value.encode()
        if len(digits) != 14:
            digits = digits[:19].translate(None, b"-: T")
    else:
        digits = utc_digits(value).encode()  # type: ignore[arg-type]
    if len(digits) != 14:
        raise ValueError(f"{what} {value!r} is not YYYY-MM-DD HH:MM:SS")
    return digits


def revoked_certificates(entries: Iterable[Entry]) -> tuple[bytes, int]:
    """The DER of ``revokedCertificates`` and the number of entries (empty bytes for no entries:
    the field is then omitted, RFC 5280 §5.1.2.6).

    revokedCertificates ::= SEQUENCE OF SEQUENCE { userCertificate CertificateSerialNumber,
    revocationDate Time, crlEntryExtensions Extensions OPTIONAL }. Every length here is below 128
    (serial ≤ 20 octets, time ≤ 17, extensions ≤ 40), so each is one octet.

    The store's text times become digits by ``bytes.translate`` (C, ~0.15 µs): measured on 1M
    rows, formatting them in SQLite (``strftime``) cost 0.6 s and ``str.translate`` 0.5 s.
    """
    out = bytearray()
    count = 0
    reasons = _EXTENSIONS_OF_REASON
    short = _SHORT_LENGTH
    fromhex = bytes.fromhex
    for serial, revoked_at, reason, invalidity in entries:
        count += 1
        text = serial if type(serial) is str else serial_hex(serial)  # type: ignore[arg-type]
        size = len(text)
        if size & 1:
            text = "0" + text
            size += 1
        if text[0] > "7":  # high bit set: a zero octet keeps the INTEGER positive
            text = "00" + text
            size += 2
        if size > 40 or (size == 2 and text == "00"):
            raise ValueError(f"serial {serial} is not positive or longer than 20 octets (RFC 5280 §4.1.2.2)")
        if type(revoked_at) is str and revoked_at[4:5] == "-":  # the store's text, inline: 1M calls cost ~0.2 s
            when = revoked_at.encode()[:19].translate(None, b"-: T")
            if len(when) != 14:
                raise ValueError(f"revocation time {revoked_at!r} is not YYYY-MM-DD HH:MM:SS")
        else:
            when = _der_time_digits(revoked_at, "revocation time")
        # RFC 5280 §5.1.2.6: UTCTime for 1950-2049, GeneralizedTime otherwise
        date = b"\x17\x0d" + when[2:] if b"1950" <= when < b"2050" else b"\x18\x0f" + when
        try:
            extensions = reasons[reason]
        except KeyError:
            raise ValueError(f"unknown revocation reason {reason!r}") from None
        if invalidity is not None:
            extensions += _INVALIDITY_PREFIX + _der_time_digits(invalidity, "invalidity date") + b"Z"
        body = b"\x02" + short[size >> 1] + fromhex(text) + date + b"Z"
        if extensions:
            body += b"\x30" + short[len(extensions)] + extensions
        out += b"\x30" + short[len(body)] + body
    if not count:
        return b"", 0
    return b"".join((b"\x30", length(len(out)), out)), count


def read_tlv(data: bytes | memoryview | mmap, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the element at ``offset`` (single-octet tags only)."""
    tag = data[offset]
    first = data[offset + 1]
    if first < 0x80:
        return tag, offset + 2, offset + 2 + first
    octets = first & 0x7F
    size = int.from_bytes(data[offset + 2 : offset + 2 + octets], "big")
    start = offset + 2 + octets
    return tag, start, start + size


def splice_entries(tbs: bytes, revoked: bytes) -> bytes:
    """Put ``revoked`` into an entry-less TBSCertList, right before its crlExtensions ([0]).

    TBSCertList ::= SEQUENCE { version, signature, issuer, thisUpdate, nextUpdate OPTIONAL,
    revokedCertificates OPTIONAL, crlExtensions [0] EXPLICIT OPTIONAL }: with version, nextUpdate
    and no entries, the element after the fifth is the [0].
    """
    tag, start, end = read_tlv(tbs, 0)
    if tag != 0x30 or end != len(tbs):
        raise ValueError("not a DER TBSCertList")
    position = start
    for _ in range(5):
        position = read_tlv(tbs, position)[2]
    if position != end and tbs[position] != 0xA0:
        raise ValueError("the TBSCertList template is not a v2 CRL without entries")
    body = (tbs[start:position], revoked, tbs[position:end])
    return b"".join((b"\x30", length(sum(map(len, body))), *body))


def certificate_list(tbs: bytes, signature_algorithm: bytes, signature: bytes) -> bytes:
    """CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue BIT STRING }."""
    bit_string = tlv(0x03, b"\x00" + signature)
    return b"".join(
        (b"\x30", length(len(tbs) + len(signature_algorithm) + len(bit_string)), tbs, signature_algorithm, bit_string)
    )


_CRL_NUMBER_OID = b"\x06\x03\x55\x1d\x14"  # id-ce-cRLNumber (RFC 5280 §5.2.3)


def crl_number(der: bytes | memoryview | mmap) -> int | None:
    """The cRLNumber of a DER CRL, read by walking the headers past the entries (a memory-mapped
    file of a 1M-entry CRL is touched on a few pages, where a full parse read 44 MB and took
    0.1 s). None when the CRL has no number; ValueError when it is not a CRL's DER.

    TBSCertList ::= SEQUENCE { version INTEGER OPTIONAL, signature, issuer, thisUpdate,
    nextUpdate Time OPTIONAL, revokedCertificates SEQUENCE OPTIONAL, crlExtensions [0] EXPLICIT
    Extensions OPTIONAL }; Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE,
    extnValue OCTET STRING }.
    """
    try:
        tag, start, end = read_tlv(der, 0)
        if tag != 0x30 or end != len(der):
            raise ValueError("not a DER CertificateList")
        tag, position, tbs_end = read_tlv(der, start)
        if tag != 0x30 or tbs_end > end:
            raise ValueError("not a DER TBSCertList")
        while position < tbs_end:
            tag, content, position = read_tlv(der, position)
            if tag != 0xA0:
                continue
            _, extension, extensions_end = read_tlv(der, content)  # SEQUENCE OF Extension
            while extension < extensions_end:
                _, field, extension = read_tlv(der, extension)
                oid_end = read_tlv(der, field)[2]
                if der[field:oid_end] != _CRL_NUMBER_OID:
                    continue
                tag, value, value_end = read_tlv(der, oid_end)
                if tag == 0x01:  # critical (never for a cRLNumber, but allowed by the syntax)
                    tag, value, value_end = read_tlv(der, value_end)
                tag, number, number_end = read_tlv(der, value)  # the OCTET STRING's INTEGER
                if tag != 0x02 or number_end > value_end:
                    raise ValueError("the cRLNumber is not an INTEGER")
                return int.from_bytes(der[number:number_end], "big", signed=True)
        return None
    except IndexError:
        raise ValueError("truncated DER") from None


def split_certificate_list(der: bytes) -> tuple[bytes, bytes]:
    """(tbsCertList, signatureAlgorithm) of a DER CertificateList, both as their full DER."""
    tag, start, end = read_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a DER CertificateList")
    tbs_end = read_tlv(der, start)[2]
    algorithm_end = read_tlv(der, tbs_end)[2]
    return der[start:tbs_end], der[tbs_end:algorithm_end]
