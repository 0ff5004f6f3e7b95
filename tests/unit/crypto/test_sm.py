"""crypto/sm.py against the standard vectors and an independent implementation (the pure-Python gmssl).

Vectors: SM3 from GB/T 32905-2016 appendix A, SM4 from GB/T 32907-2016 appendix A, SM4-GCM from
RFC 8998 appendix A.1, and the SM2 signature of GM/T 0003.5-2012 on the recommended curve (the
worked example of GB/T 32918.2 uses a test curve no library here accepts).
"""

from __future__ import annotations

import json

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gmssl import func as gmssl_func
from gmssl import sm2 as gmssl_sm2
from gmssl import sm3 as gmssl_sm3
from gmssl import sm4 as gmssl_sm4
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import b64url_decode
from crypto.sm import (
    ALG_SM2_SM3,
    DEFAULT_SIGNER_ID,
    Sm2SigningKey,
    Sm2VerifyKey,
    Sm4GcmCipher,
    hmac_sm3,
    sm2_kid,
    sm2_public_from_jwk,
    sm2_verify,
    sm3,
    sm4_encrypt_block,
)

# SM2 recommended curve parameters (GB/T 32918.5-2017), for computing ZA independently of crypto/sm.py.
CURVE_A = bytes.fromhex("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC")
CURVE_B = bytes.fromhex("28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93")
CURVE_GX = bytes.fromhex("32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7")
CURVE_GY = bytes.fromhex("BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0")
CURVE_N = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123", 16)

KAT_PRIVATE = bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8")
KAT_PUBLIC = bytes.fromhex(
    "04"
    "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
    "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
)
KAT_MESSAGE = b"message digest"
KAT_DIGEST = bytes.fromhex("F0B43E94BA45ACCAACE692ED534382EB17E6AB5A19CE7B31F4486FDFC0D28640")
KAT_SIGNATURE = bytes.fromhex(
    "F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3"
    "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA"
)
OTHER_ID = b"ALICE123@YAHOO.COM"

SM4_KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")

GCM_NONCE = bytes.fromhex("00001234567800000000ABCD")
GCM_AAD = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
GCM_PLAIN = bytes.fromhex(
    "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
    "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
)
GCM_CIPHERTEXT = bytes.fromhex(
    "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
    "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
)
GCM_TAG = bytes.fromhex("83DE3541E4C2B58177E065A9BF7B62EC")


def gmssl_hash(data: bytes) -> bytes:
    return bytes.fromhex(gmssl_sm3.sm3_hash(gmssl_func.bytes_to_list(data)))


def gmssl_e(public: bytes, message: bytes, signer_id: bytes) -> bytes:
    """e = SM3(ZA ‖ M), written out from GB/T 32918.2 §6.1 with gmssl's SM3."""
    entl = (len(signer_id) * 8).to_bytes(2, "big")
    za = gmssl_hash(entl + signer_id + CURVE_A + CURVE_B + CURVE_GX + CURVE_GY + public[1:])
    return gmssl_hash(za + message)


def gmssl_key(private: bytes, public: bytes) -> gmssl_sm2.CryptSM2:
    key = gmssl_sm2.CryptSM2(private_key=private.hex(), public_key="")
    # Set after construction: gmssl 3.2.2's constructor does public_key.lstrip("04") when the text
    # starts with "04", which mangles every key whose x begins with the byte 0x04 (1 key in 256).
    key.public_key = public[1:].hex()
    return key


def gmssl_sign(private: bytes, public: bytes, message: bytes, signer_id: bytes) -> bytes:
    key = gmssl_key(private, public)
    if signer_id == DEFAULT_SIGNER_ID:  # gmssl's own ZA, default ID built in: fully independent of ours
        return bytes.fromhex(key.sign_with_sm3(message))
    return bytes.fromhex(key.sign(gmssl_e(public, message, signer_id), gmssl_func.random_hex(key.para_len)))


def gmssl_verify(public: bytes, signature: bytes, message: bytes, signer_id: bytes) -> bool:
    key = gmssl_key(b"", public)
    if signer_id == DEFAULT_SIGNER_ID:
        return bool(key.verify_with_sm3(signature.hex(), message))
    return bool(key.verify(signature.hex(), gmssl_e(public, message, signer_id)))


@pytest.fixture(scope="module")
def key() -> Sm2SigningKey:
    return Sm2SigningKey.generate()


# --- SM3, HMAC-SM3 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "digest"),
    [
        (b"abc", "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"),
        (b"abcd" * 16, "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"),
    ],
)
def test_sm3_standard_vectors(message: bytes, digest: str) -> None:
    assert sm3(message).hex() == digest
    assert gmssl_hash(message).hex() == digest


@given(st.binary(max_size=300))
@settings(max_examples=50)
def test_sm3_matches_the_independent_implementation(data: bytes) -> None:
    assert sm3(data) == gmssl_hash(data)


@pytest.mark.parametrize("key_length", [0, 16, 64, 65, 100])
def test_hmac_sm3_is_rfc_2104_over_sm3(key_length: int) -> None:
    hmac_key = bytes(range(key_length))
    message = b"blind index input"
    block = gmssl_hash(hmac_key) if len(hmac_key) > 64 else hmac_key
    block = block.ljust(64, b"\x00")
    inner = gmssl_hash(bytes(b ^ 0x36 for b in block) + message)
    expected = gmssl_hash(bytes(b ^ 0x5C for b in block) + inner)
    assert hmac_sm3(hmac_key, message) == expected
    assert hmac_sm3(hmac_key, message + b"!") != expected


# --- SM4, SM4-GCM ----------------------------------------------------------------------------------


def test_sm4_standard_vector() -> None:
    assert sm4_encrypt_block(SM4_KEY, SM4_KEY).hex() == "681edf34d206965e86b3e94f536e4246"
    independent = gmssl_sm4.CryptSM4(padding_mode=3)
    independent.set_key(SM4_KEY, gmssl_sm4.SM4_ENCRYPT)
    assert bytes(independent.crypt_ecb(SM4_KEY)).hex() == "681edf34d206965e86b3e94f536e4246"


def test_sm4_million_iterations_vector() -> None:
    """GB/T 32907 appendix A.2: the block encrypted 1,000,000 times, through the primitive sm.py uses."""
    encryptor = Cipher(algorithms.SM4(SM4_KEY), modes.ECB()).encryptor()
    block = SM4_KEY
    for _ in range(1_000_000):
        block = encryptor.update(block)
    assert block.hex() == "595298c7c6fd271f0402f804c33d3f66"


def test_sm4_block_refuses_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="16-byte"):
        sm4_encrypt_block(SM4_KEY[:15], SM4_KEY)
    with pytest.raises(ValueError, match="16-byte"):
        sm4_encrypt_block(SM4_KEY, SM4_KEY + b"\x00")


def test_sm4_gcm_rfc_8998_vector() -> None:
    cipher = Sm4GcmCipher(SM4_KEY)
    assert cipher.decrypt(GCM_NONCE + GCM_CIPHERTEXT + GCM_TAG, GCM_AAD) == GCM_PLAIN
    with pytest.raises(InvalidTag):
        cipher.decrypt(GCM_NONCE + GCM_CIPHERTEXT + GCM_TAG, GCM_AAD[:-1])


@given(plaintext=st.binary(max_size=200), aad=st.binary(max_size=40))
@settings(max_examples=100)
def test_sm4_gcm_round_trip(plaintext: bytes, aad: bytes) -> None:
    cipher = Sm4GcmCipher(SM4_KEY)
    blob = cipher.encrypt(plaintext, aad)
    assert len(blob) == 12 + len(plaintext) + 16
    assert cipher.decrypt(blob, aad) == plaintext
    assert cipher.encrypt(plaintext, aad)[:12] != blob[:12]  # a fresh nonce each time


@given(plaintext=st.binary(max_size=100), data=st.data())
@settings(max_examples=100)
def test_sm4_gcm_detects_any_flipped_bit(plaintext: bytes, data: st.DataObject) -> None:
    cipher = Sm4GcmCipher(SM4_KEY)
    blob = bytearray(cipher.encrypt(plaintext, b"name"))
    position = data.draw(st.integers(0, len(blob) - 1))
    blob[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(InvalidTag):
        cipher.decrypt(bytes(blob), b"name")


def test_sm4_gcm_refuses_other_field_truncation_and_other_key() -> None:
    cipher = Sm4GcmCipher(SM4_KEY)
    blob = cipher.encrypt(b"110101199003077777", b"citizen_id")
    for bad_blob, aad in [(blob, b"name"), (blob[:-1], b"citizen_id"), (blob[:27], b"citizen_id"), (b"", b"")]:
        with pytest.raises(InvalidTag):
            cipher.decrypt(bad_blob, aad)
    with pytest.raises(InvalidTag):
        Sm4GcmCipher(bytes(16)).decrypt(blob, b"citizen_id")
    with pytest.raises(ValueError, match="16 bytes"):
        Sm4GcmCipher(bytes(32))


# --- SM2 -------------------------------------------------------------------------------------------


def test_sm2_known_answer_on_the_recommended_curve() -> None:
    signing = Sm2SigningKey(KAT_PRIVATE)
    assert signing.public == KAT_PUBLIC  # the public point derived from the private key
    assert gmssl_e(KAT_PUBLIC, KAT_MESSAGE, DEFAULT_SIGNER_ID) == KAT_DIGEST  # the vector's e, our ZA formula
    verify_key = signing.verify_key("510000")
    assert verify_key.verify(KAT_SIGNATURE, KAT_MESSAGE)
    assert gmssl_verify(KAT_PUBLIC, KAT_SIGNATURE, KAT_MESSAGE, DEFAULT_SIGNER_ID)
    assert not verify_key.verify(KAT_SIGNATURE, b"message digesT")
    assert not verify_key.verify(KAT_SIGNATURE[:32] + KAT_SIGNATURE[:32], KAT_MESSAGE)
    # The same pair under another signer ID is another ZA, so the vector must not verify.
    assert not Sm2VerifyKey(KAT_PUBLIC, "510000", signer_id=OTHER_ID).verify(KAT_SIGNATURE, KAT_MESSAGE)


def test_sm2_round_trip(key: Sm2SigningKey) -> None:
    verify_key = key.verify_key("510000")
    signature = key.sign(b"credential bytes")
    assert len(signature) == 64
    assert verify_key.verify(signature, b"credential bytes")
    assert sm2_verify(key.public, signature, b"credential bytes")
    assert not verify_key.verify(signature, b"credential bytez")
    assert not Sm2SigningKey.generate().verify_key("510000").verify(signature, b"credential bytes")
    assert key.sign(b"credential bytes") != signature  # randomised k


def test_sm2_signer_id_is_part_of_the_signature() -> None:
    alice = Sm2SigningKey(KAT_PRIVATE, signer_id=OTHER_ID)
    signature = alice.sign(b"m")
    assert alice.verify_key("510000").verify(signature, b"m")
    assert not Sm2VerifyKey(alice.public, "510000").verify(signature, b"m")
    assert alice.kid == Sm2SigningKey(KAT_PRIVATE).kid  # the kid names the key, not the ID
    with pytest.raises(ValueError, match="signer ID"):
        Sm2SigningKey(KAT_PRIVATE, signer_id=b"")


@pytest.mark.parametrize("signer_id", [DEFAULT_SIGNER_ID, OTHER_ID], ids=["default-id", "other-id"])
def test_sm2_independent_implementation_verifies_ours_and_we_verify_its(signer_id: bytes) -> None:
    for _ in range(3):
        ours = Sm2SigningKey.generate(signer_id)
        message = b"\x84C\xa1\x01:\x00\x01\x00\x01" + ours.kid  # any bytes: a Sig_structure-like prefix
        signature = ours.sign(message)
        assert gmssl_verify(ours.public, signature, message, signer_id)
        assert not gmssl_verify(ours.public, signature, message + b"\x00", signer_id)
        theirs = gmssl_sign(ours.private, ours.public, message, signer_id)
        assert len(theirs) == 64
        assert ours.verify_key("510000").verify(theirs, message)
        assert not ours.verify_key("510000").verify(theirs, message[:-1])


def test_sm2_interop_with_a_key_whose_x_begins_with_04() -> None:
    """The key gmssl's constructor would mangle (see gmssl_key): d = 11 has x = 04 04 b3 …."""
    ours = Sm2SigningKey((11).to_bytes(32, "big"))
    assert ours.public[:2] == b"\x04\x04"  # point prefix, then x's first byte
    signature = ours.sign(b"m")
    assert gmssl_verify(ours.public, signature, b"m", DEFAULT_SIGNER_ID)
    assert ours.verify_key("510000").verify(gmssl_sign(ours.private, ours.public, b"m", DEFAULT_SIGNER_ID), b"m")


@given(signature=st.binary(max_size=80), message=st.binary(max_size=40))
@settings(max_examples=200)
def test_sm2_garbage_signatures_are_false_never_an_exception(
    key: Sm2SigningKey, signature: bytes, message: bytes
) -> None:
    assert key.verify_key("510000").verify(signature, message) is False


@pytest.mark.parametrize(
    "signature",
    [
        bytes(64),
        b"\xff" * 64,
        CURVE_N.to_bytes(32, "big") * 2,  # r = s = n: out of range
        (CURVE_N - 1).to_bytes(32, "big") + (1).to_bytes(32, "big"),
        KAT_SIGNATURE[:32] + bytes(32),
    ],
    ids=["zeros", "ones", "r=s=n", "r=n-1,s=1", "s=0"],
)
def test_sm2_out_of_range_signatures_are_false(signature: bytes) -> None:
    assert Sm2VerifyKey(KAT_PUBLIC, "510000").verify(signature, KAT_MESSAGE) is False


def test_sm2_non_bytes_are_false(key: Sm2SigningKey) -> None:
    verify_key = key.verify_key("510000")
    assert verify_key.verify("00" * 64, b"m") is False  # type: ignore[arg-type]
    assert verify_key.verify(key.sign(b"m"), "m") is False  # type: ignore[arg-type]


@given(public=st.binary(max_size=70))
@settings(max_examples=200)
def test_sm2_garbage_public_keys_are_false_never_an_exception(public: bytes) -> None:
    assert sm2_verify(public, KAT_SIGNATURE, KAT_MESSAGE) is False or public == KAT_PUBLIC


@pytest.mark.parametrize(
    "public",
    [
        b"\x04" + bytes(64),  # not on the curve
        b"\x04" + KAT_PUBLIC[1:33] + bytes(32),  # right x, wrong y
        b"\x02" + KAT_PUBLIC[1:],  # wrong prefix
        KAT_PUBLIC[:33],  # compressed-length
        b"\x04" + b"\xff" * 64,  # coordinates ≥ p
        b"\x04" + CURVE_GX + CURVE_GY + b"\x00",  # one byte too many
    ],
)
def test_sm2_bad_public_keys_fail_at_load_with_value_error(public: bytes) -> None:
    with pytest.raises(ValueError, match="SM2 public key"):
        Sm2VerifyKey(public, "510000")
    assert sm2_verify(public, KAT_SIGNATURE, KAT_MESSAGE) is False


@pytest.mark.parametrize(
    "private", [bytes(32), CURVE_N.to_bytes(32, "big"), (CURVE_N - 1).to_bytes(32, "big"), b"\x01" * 31, b"\xff" * 32]
)
def test_sm2_bad_private_keys_are_refused(private: bytes) -> None:
    with pytest.raises(ValueError, match="SM2 private key"):
        Sm2SigningKey(private)


# --- JWK, kid, COSE algorithm ----------------------------------------------------------------------


def test_sm2_jwk_and_kid(key: Sm2SigningKey) -> None:
    jwk = key.verify_key("440000").jwk()
    assert list(jwk)[:4] == ["crv", "kty", "x", "y"]
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["region"]) == ("EC", "SM2", "sig", "440000")
    assert b"\x04" + b64url_decode(jwk["x"]) + b64url_decode(jwk["y"]) == key.public
    assert sm2_public_from_jwk(jwk) == key.public
    # RFC 7638: the required members, sorted, no whitespace; hashed with SM3 (here gmssl's).
    canonical = json.dumps({m: jwk[m] for m in ("crv", "kty", "x", "y")}, separators=(",", ":")).encode()
    assert b64url_decode(jwk["kid"]) == gmssl_hash(canonical)[:8] == key.kid == sm2_kid(key.public)


@pytest.mark.parametrize(
    "jwk",
    [
        None,
        {"kty": "OKP", "crv": "Ed25519", "x": "AA"},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "SM2", "x": "AA"},
        {"kty": "EC", "crv": "SM2", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "SM2", "x": "A" * 43 + "=", "y": "A" * 43},
        {"kty": "EC", "crv": "SM2", "x": "A" * 43, "y": "A" * 43},  # (0, 0) is not on the curve
    ],
)
def test_sm2_bad_jwks_raise_value_error(jwk: object) -> None:
    with pytest.raises(ValueError, match="SM2 JWK"):
        sm2_public_from_jwk(jwk)


def test_cose_algorithm_is_private_use_and_distinct() -> None:
    assert ALG_SM2_SM3 < -65536  # RFC 9052 §16.4: private use
    assert ALG_SM2_SM3 not in (-8, -65537)  # not EdDSA, not the credential's private claim key
