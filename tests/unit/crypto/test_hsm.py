"""Issuer keys in a real PKCS#11 module (SoftHSM2): generated there, never extractable, codes accepted by
every verifier we have and by pycose, clear errors for a wrong PIN, a missing module or token, and a
token failure that is `SigningUnavailable`, then recovered from."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass
from pycose.messages import CoseMessage

from crypto import algorithms, hsm
from crypto.credential import Claims, Purpose, issue_credential, open_credential, verify_credential
from crypto.hsm import HsmConfigurationError, Pkcs11Config, Pkcs11Ed25519Key, Pkcs11Token, VendorMechanisms
from crypto.keys import ALG_EDDSA, SigningUnavailable, kid_for
from crypto.offline import OfflineKit, kit_document, verify_offline
from crypto.seal import CardRefSeal
from crypto.status_list import StatusList, sign_status_list
from tests.softhsm import ISSUERS, PIN_CHECK, SoftHsm
from tests.unit.crypto.test_cose_interop import cose_bytes, pycose_public_key

REGION = "510000"


def _config(softhsm: SoftHsm, token: str = ISSUERS, pin: str | None = None) -> Pkcs11Config:
    return Pkcs11Config(softhsm.module, token, softhsm.pins[token] if pin is None else pin)


@pytest.fixture
def token(softhsm: SoftHsm) -> Iterator[Pkcs11Token]:
    opened = Pkcs11Token.open(_config(softhsm))
    yield opened
    opened.close()


def _claims(now: int) -> Claims:
    return Claims(bytes(range(16)), bytes(range(7)), REGION, Purpose.TRANSIT, now - 5, now + 55)


def test_a_key_generated_in_the_token_never_leaves_it(token: Pkcs11Token) -> None:
    key = token.generate("Ed25519", REGION)
    assert isinstance(key, Pkcs11Ed25519Key) and key.blocking and key.alg == ALG_EDDSA
    assert key.kid == kid_for(key.public)
    assert key.label == f"ecard-issuer-{REGION}-{key.kid.hex()}"
    session = token.session_for_tests()
    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key.kid, label=key.label)
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.NEVER_EXTRACTABLE] is True and private[Attribute.ALWAYS_SENSITIVE] is True
    assert private[Attribute.TOKEN] is True and private[Attribute.PRIVATE] is True
    with pytest.raises(pkcs11.AttributeSensitive):
        private[Attribute.VALUE]
    # Nothing in the service can ask it for a secret to store.
    with pytest.raises(TypeError):
        algorithms.secret_of(key)
    token.check(key)  # the start-up check passes for it


def test_codes_signed_in_the_token_verify_everywhere(token: Pkcs11Token) -> None:
    key = token.generate("Ed25519", REGION)
    seal = CardRefSeal.derive(bytes(32), "Ed25519", REGION, key.kid)
    now = int(time.time())
    text = issue_credential(key, _claims(now), seal)
    keys = {key.kid: key.verify_key(REGION)}
    # The server's check, the issuer's view (card reference unsealed) and the offline verifier.
    assert verify_credential(text, keys, now, 5).claims.region == REGION
    assert open_credential(text, keys, {key.kid: seal}).claims.card_ref == bytes(range(16))
    status = sign_status_list(
        key, region=REGION, subject="https://ecard.example/kit", status_list=StatusList.from_statuses({}, size=0),
        issued_at=now, expires_at=now + 3600, ttl=300,
    )  # fmt: skip
    kit = OfflineKit.from_json(__import__("json").dumps(kit_document(REGION, keys.values(), status)))
    assert verify_offline(text, kit, now, 5).accepted
    # An independent COSE implementation, with nothing but the public key.
    message = CoseMessage.decode(cose_bytes(text))
    message.key = pycose_public_key(key.verify_key(REGION))  # type: ignore[arg-type]
    assert message.verify_signature() is True


def test_a_wrong_pin_a_missing_module_or_token_are_clear_errors(softhsm: SoftHsm, tmp_path: Path) -> None:
    wrong = "000000"
    with pytest.raises(HsmConfigurationError, match="refused the PIN") as refused:
        Pkcs11Token.open(_config(softhsm, PIN_CHECK, wrong))
    assert wrong not in str(refused.value)
    with pytest.raises(HsmConfigurationError, match="no such file"):
        Pkcs11Token.open(Pkcs11Config(tmp_path / "libvendor.so", ISSUERS, "1234"))
    with pytest.raises(HsmConfigurationError, match="no token labelled 'no-such-token'"):
        Pkcs11Token.open(Pkcs11Config(softhsm.module, "no-such-token", "1234"))


def test_a_second_open_in_the_process_shares_the_login_and_checks_the_pin(softhsm: SoftHsm, token: Pkcs11Token) -> None:
    with pytest.raises(HsmConfigurationError, match="refused the PIN"):
        Pkcs11Token.open(_config(softhsm, pin="not-the-pin"))
    again = Pkcs11Token.open(_config(softhsm))
    assert again is token
    again.close()  # not the last user: the session stays logged in
    key = token.generate("Ed25519", REGION)
    assert len(key.sign(b"still logged in")) == 64


def test_a_failed_token_is_signing_unavailable_then_logged_in_again(
    token: Pkcs11Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = token.generate("Ed25519", REGION)
    token.session_for_tests().close()  # the session (and the login) gone, as when a device resets
    with pytest.raises(SigningUnavailable, match="failed"):
        key.sign(b"message")
    # Within a second of the failure the token is not tried again.
    with pytest.raises(SigningUnavailable, match="a moment ago"):
        key.sign(b"message")
    monkeypatch.setattr(hsm, "RECONNECT_INTERVAL", 0.0)
    signature = key.sign(b"message")
    assert key.verify_key(REGION).verify(signature, b"message")


def test_sm2_takes_the_modules_vendor_mechanisms(softhsm: SoftHsm, token: Pkcs11Token) -> None:
    with pytest.raises(HsmConfigurationError, match="ECARD_PKCS11_SM2"):
        token.generate("SM2", REGION)
    mechanisms = VendorMechanisms.parse("key_type=0x80000001, generate=0x80000002,sign=2147483651")
    assert mechanisms == VendorMechanisms(0x8000_0001, 0x8000_0002, 0x8000_0003)
    for bad in ("key_type=1,generate=2", "key_type=x,generate=2,sign=3", "key_type=1,generate=2,sign=3,other=4"):
        with pytest.raises(ValueError, match="SM2 vendor mechanisms"):
            VendorMechanisms.parse(bad)
    # A vendor value reaches the module as given: SoftHSM has no SM2 and says so for the mechanism.
    key = token.generate("Ed25519", REGION)
    with pytest.raises(SigningUnavailable, match="MechanismInvalid"):
        token.sign(key.label, key.kid, mechanisms.sign, b"message")
    assert len(key.sign(b"message")) == 64  # and the session is still good
