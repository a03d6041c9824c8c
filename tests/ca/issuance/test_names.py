"""A charger's CN is an OCPP charging station identity: never a URL, never an IP address."""

from __future__ import annotations

import pytest

from ca.errors import PolicyError
from ca.issuance.names import check_charger_identity


@pytest.mark.parametrize(
    "identity",
    ["CP-000001", "DE*ABC*E1234", "cp.site-1", "1234", "12.34.56", "a:b:c", "1.2.3.4.5", "::x", "0x7f000001"],
)
def test_station_identities_are_accepted(identity: str) -> None:
    assert check_charger_identity(identity) == identity


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "127.0.0.1", "::1", "fe80::1", "2001:db8::8:800:200c:417a", "::ffff:1.2.3.4"]
)
def test_an_ip_address_is_never_a_station_identity(address: str) -> None:
    with pytest.raises(PolicyError, match="is an IP address") as refused:
        check_charger_identity(address)
    assert refused.value.code == "bad_identity"


@pytest.mark.parametrize("value", ["", "a" * 49, "CP 1", "CP/1", "CP-1\x00", "https://x"])
def test_other_characters_and_lengths_are_refused(value: str) -> None:
    with pytest.raises(PolicyError, match="is not a charging station identity"):
        check_charger_identity(value)
