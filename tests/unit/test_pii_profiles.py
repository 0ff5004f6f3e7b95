"""Personal data under both crypto profiles: tagged SM4-GCM blobs, HMAC-SM3 indexes, the dual-index period.

The national scheme is checked against the published vectors through an independent GCM written out
here over gmssl's SM4 block (itself checked on GB/T 32907's example) and validated on RFC 8998 A.1's
SM4-GCM vector, and the HMAC-SM3 index against RFC 2104 over gmssl's SM3 (checked on GM/T 0004's
"abc" and 16 times "abcd" examples). The international scheme must stay byte for byte what it was.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gmssl import func as gmssl_func
from gmssl import sm3 as gmssl_sm3
from gmssl import sm4 as gmssl_sm4
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.cards.services import ACTIVATION_CODE_FIELD, activation_code_hash, activation_code_hashes
from app.security.keyring import KeyringError, generate_keyring, load_keyring, read_keyring
from app.security.pii import INTERNATIONAL, NATIONAL, SM4_GCM_TAG, PiiCipher
from app.settings import DEV_KEYS_DIR, Settings
from crypto.sm import Sm4GcmCipher

AES_KEY, INDEX_KEY = os.urandom(32), os.urandom(32)
SM4_KEY, SM3_KEY = os.urandom(16), os.urandom(32)
INTL_ONLY = PiiCipher(AES_KEY, INDEX_KEY)
NAT_ONLY = PiiCipher(None, None, sm4_key=SM4_KEY, sm3_index_key=SM3_KEY, profile=NATIONAL)
INTL = PiiCipher(AES_KEY, INDEX_KEY, sm4_key=SM4_KEY, sm3_index_key=SM3_KEY, profile=INTERNATIONAL)
NAT = PiiCipher(AES_KEY, INDEX_KEY, sm4_key=SM4_KEY, sm3_index_key=SM3_KEY, profile=NATIONAL)
FIELD = "persons.name"

# GB/T 32907-2016 appendix A.1 and RFC 8998 appendix A.1 (SM4-GCM).
GBT_KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")
RFC_IV = bytes.fromhex("00001234567800000000ABCD")
RFC_AAD = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
RFC_PLAIN = bytes.fromhex(
    "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
    "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
)
RFC_CIPHERTEXT = bytes.fromhex(
    "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
    "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
)
RFC_TAG = bytes.fromhex("83DE3541E4C2B58177E065A9BF7B62EC")


# --- an independent SM4-GCM (NIST SP 800-38D over gmssl's SM4 block) -------------------------------


def _sm4_block(key: bytes, block: bytes) -> bytes:
    cipher = gmssl_sm4.CryptSM4(padding_mode=3)  # no padding: one block in, one out
    cipher.set_key(key, gmssl_sm4.SM4_ENCRYPT)
    return bytes(cipher.crypt_ecb(block))


def _gf_mult(x: int, y: int) -> int:
    z, v = 0, y
    for bit in range(127, -1, -1):
        if (x >> bit) & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def _ghash(h: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    def blocks(data: bytes) -> list[bytes]:
        padded = data + b"\x00" * (-len(data) % 16)
        return [padded[i : i + 16] for i in range(0, len(padded), 16)]

    lengths = (len(aad) * 8).to_bytes(8, "big") + (len(ciphertext) * 8).to_bytes(8, "big")
    x, key = 0, int.from_bytes(h, "big")
    for block in [*blocks(aad), *blocks(ciphertext), lengths]:
        x = _gf_mult(x ^ int.from_bytes(block, "big"), key)
    return x.to_bytes(16, "big")


def gcm_seal(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """(ciphertext, tag) of SM4-GCM with a 96-bit IV, from the block cipher alone."""
    counter = int.from_bytes(iv + b"\x00\x00\x00\x01", "big")
    stream = b"".join(
        _sm4_block(key, (counter + 1 + i).to_bytes(16, "big")) for i in range((len(plaintext) + 15) // 16)
    )
    ciphertext = bytes(p ^ s for p, s in zip(plaintext, stream, strict=False))
    mask = _sm4_block(key, counter.to_bytes(16, "big"))
    tag = bytes(a ^ b for a, b in zip(_ghash(_sm4_block(key, bytes(16)), aad, ciphertext), mask, strict=True))
    return ciphertext, tag


def sm3_independent(data: bytes) -> bytes:
    return bytes.fromhex(gmssl_sm3.sm3_hash(gmssl_func.bytes_to_list(data)))


def hmac_sm3_independent(key: bytes, message: bytes) -> bytes:
    block = (sm3_independent(key) if len(key) > 64 else key).ljust(64, b"\x00")
    inner = sm3_independent(bytes(b ^ 0x36 for b in block) + message)
    return sm3_independent(bytes(b ^ 0x5C for b in block) + inner)


def test_the_independent_primitives_match_the_published_vectors() -> None:
    assert _sm4_block(GBT_KEY, GBT_KEY).hex() == "681edf34d206965e86b3e94f536e4246"  # GB/T 32907 A.1
    assert gcm_seal(GBT_KEY, RFC_IV, RFC_PLAIN, RFC_AAD) == (RFC_CIPHERTEXT, RFC_TAG)  # RFC 8998 A.1
    assert sm3_independent(b"abc").hex() == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    assert sm3_independent(b"abcd" * 16).hex() == "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"


# --- the national scheme ----------------------------------------------------------------------------


def test_the_rfc_8998_vector_opens_as_a_tagged_blob() -> None:
    cipher = PiiCipher(None, None, sm4_key=GBT_KEY, sm3_index_key=SM3_KEY, profile=NATIONAL)
    blob = bytes([SM4_GCM_TAG]) + RFC_IV + RFC_CIPHERTEXT + RFC_TAG
    # The vector's associated data is not text, so the cipher's SM4 half is asked directly.
    assert Sm4GcmCipher(GBT_KEY).decrypt(blob[1:], RFC_AAD) == RFC_PLAIN
    with pytest.raises(InvalidTag):
        cipher.decrypt_bytes(blob, FIELD)  # the field is part of the associated data


@given(st.binary(max_size=100))
@settings(max_examples=25, deadline=None)
def test_national_blobs_are_the_tag_byte_and_sm4_gcm_of_the_standard(plaintext: bytes) -> None:
    blob = NAT_ONLY.encrypt_bytes(plaintext, FIELD)
    assert blob[0] == SM4_GCM_TAG and len(blob) == 1 + 12 + len(plaintext) + 16
    nonce, body, tag = blob[1:13], blob[13:-16], blob[-16:]
    assert gcm_seal(SM4_KEY, nonce, plaintext, FIELD.encode()) == (body, tag)
    # And the other way: a blob sealed independently opens.
    iv = os.urandom(12)
    ciphertext, tag = gcm_seal(SM4_KEY, iv, plaintext, FIELD.encode())
    assert NAT_ONLY.decrypt_bytes(bytes([SM4_GCM_TAG]) + iv + ciphertext + tag, FIELD) == plaintext


def test_the_national_index_is_hmac_sm3_of_field_and_normalised_value() -> None:
    value = " 11010519491231002x "
    expected = hmac_sm3_independent(SM3_KEY, b"persons.citizen_id\x0011010519491231002X")
    assert NAT_ONLY.blind_index(value, "persons.citizen_id") == expected
    assert NAT.blind_index(value, "persons.citizen_id") == expected
    assert INTL.blind_index_as(value, "persons.citizen_id", NATIONAL) == expected


# --- the international scheme, byte for byte ---------------------------------------------------------


def test_international_blobs_are_untagged_aes_gcm_as_before() -> None:
    for cipher in (INTL_ONLY, INTL):
        blob = cipher.encrypt("张三", FIELD)
        assert len(blob) == 12 + len("张三".encode()) + 16
        assert AESGCM(AES_KEY).decrypt(blob[:12], blob[12:], FIELD.encode()) == "张三".encode()
        message = b"persons.citizen_id\x0011010519491231002X"
        assert (
            cipher.blind_index("11010519491231002x", "persons.citizen_id")
            == hmac.new(INDEX_KEY, message, hashlib.sha256).digest()
        )


def test_the_pseudonym_key_stays_the_international_one_while_its_key_is_held() -> None:
    legacy = hmac.new(INDEX_KEY, b"verification.pseudonym_key\x00CARD-PSEUDONYM", hashlib.sha256).digest()
    assert INTL_ONLY.pseudonym_key() == INTL.pseudonym_key() == NAT.pseudonym_key() == legacy
    national = hmac_sm3_independent(SM3_KEY, b"verification.pseudonym_key\x00CARD-PSEUDONYM")
    assert NAT_ONLY.pseudonym_key() == national


# --- both profiles read both kinds ---------------------------------------------------------------------


def test_each_profile_reads_the_other_profiles_blobs_and_says_which() -> None:
    aes, sm4 = INTL.encrypt("李四", FIELD), NAT.encrypt("李四", FIELD)
    for cipher in (INTL, NAT):
        assert cipher.open(aes, FIELD) == ("李四".encode(), INTERNATIONAL)
        assert cipher.open(sm4, FIELD) == ("李四".encode(), NATIONAL)
    assert NAT_ONLY.decrypt(sm4, FIELD) == INTL_ONLY.decrypt(aes, FIELD) == "李四"
    with pytest.raises(InvalidTag):
        INTL_ONLY.decrypt(sm4, FIELD)  # no SM4 key
    with pytest.raises(InvalidTag):
        NAT_ONLY.decrypt(aes, FIELD)  # no AES key


def test_an_aes_blob_whose_nonce_starts_with_the_tag_byte_is_still_aes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: bytes([SM4_GCM_TAG]) + bytes(n - 1))
    blob = INTL.encrypt("王五", FIELD)
    monkeypatch.undo()
    assert blob[0] == SM4_GCM_TAG
    assert NAT.open(blob, FIELD) == ("王五".encode(), INTERNATIONAL)


def test_tampered_tags_and_bodies_are_refused() -> None:
    blob = NAT.encrypt("赵六", FIELD)
    for position in (0, 1, len(blob) // 2, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[position] ^= 1
        with pytest.raises(InvalidTag):
            NAT.decrypt(bytes(tampered), FIELD)
    for short in (b"", bytes([SM4_GCM_TAG]), blob[:20]):
        with pytest.raises(InvalidTag):
            NAT.decrypt_bytes(short, FIELD)
    with pytest.raises(InvalidTag):
        NAT.decrypt(blob, "persons.citizen_id")


def test_look_ups_try_both_indexes_only_in_the_dual_index_period() -> None:
    value, field = "11010519491231002X", "persons.citizen_id"
    assert INTL_ONLY.blind_indexes(value, field) == (INTL_ONLY.blind_index(value, field),)
    assert NAT_ONLY.blind_indexes(value, field) == (NAT_ONLY.blind_index(value, field),)
    sha, sm3 = INTL_ONLY.blind_index(value, field), NAT_ONLY.blind_index(value, field)
    assert sha != sm3
    assert INTL.blind_indexes(value, field) == (sha, sm3)
    assert NAT.blind_indexes(value, field) == (sm3, sha)


def test_an_activation_code_of_either_profile_matches_in_the_dual_index_period() -> None:
    ecard_id = uuid.uuid4()
    issued_before = activation_code_hash(INTL_ONLY, ecard_id, "1234-5678")
    assert issued_before in activation_code_hashes(NAT, ecard_id, "1234-5678")
    assert issued_before not in activation_code_hashes(NAT_ONLY, ecard_id, "1234-5678")
    assert issued_before not in activation_code_hashes(NAT, ecard_id, "1234-5679")
    assert (
        NAT.blind_index(f"{ecard_id.hex}:1234-5678", ACTIVATION_CODE_FIELD).hex()
        == activation_code_hashes(NAT, ecard_id, "1234-5678")[0]
    )


def test_a_cipher_refuses_a_profile_without_its_keys() -> None:
    with pytest.raises(ValueError, match="national profile needs"):
        PiiCipher(AES_KEY, INDEX_KEY, profile=NATIONAL)
    with pytest.raises(ValueError, match="international profile needs"):
        PiiCipher(None, None, sm4_key=SM4_KEY, sm3_index_key=SM3_KEY)
    with pytest.raises(ValueError, match="16 bytes"):
        PiiCipher(None, None, sm4_key=AES_KEY, sm3_index_key=SM3_KEY, profile=NATIONAL)
    with pytest.raises(ValueError, match="comes with its index key"):
        PiiCipher(AES_KEY, None)
    with pytest.raises(ValueError, match="no SM4 data key"):
        INTL_ONLY.encrypt_bytes_as(b"x", FIELD, NATIONAL)


# --- the keyring -----------------------------------------------------------------------------------------


def test_the_national_profile_needs_its_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert generate_keyring(keys) == ["data.key", "index.key", "session.pem", "trust.pem"]
    with pytest.raises(KeyringError, match=r"national needs sm4-data\.key and sm3-index\.key"):
        load_keyring(Settings(crypto_profile=NATIONAL, keys_dir=keys))
    assert generate_keyring(keys, NATIONAL, add=True) == [
        "sm4-data.key", "sm3-index.key", "trust-sm2.key", "session-sm2.key"
    ]  # fmt: skip
    for name in ("sm4-data.key", "trust-sm2.key", "session-sm2.key"):
        assert oct((keys / name).stat().st_mode & 0o777) == "0o600"
    keyring = load_keyring(Settings(mode="production", crypto_profile=NATIONAL, keys_dir=keys))
    assert keyring.sm4_key is not None and len(keyring.sm4_key) == 16
    assert keyring.trust_signer(NATIONAL) is keyring.trust_sm2_key is not None
    assert keyring.trust_signer(INTERNATIONAL) is keyring.trust_key
    assert keyring.session_signer(NATIONAL) is keyring.session_sm2_key is not None
    assert keyring.session_signer(INTERNATIONAL) is keyring.session_key
    assert keyring.session_keys() == (keyring.session_key, keyring.session_sm2_key)
    assert keyring.session_sm2_key.public != keyring.trust_sm2_key.public  # one key, one purpose
    assert keyring.pii(NATIONAL).dual_index
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        generate_keyring(keys, NATIONAL, add=True)


def test_the_national_profile_needs_its_sm2_trust_list_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys, NATIONAL)
    (keys / "trust-sm2.key").unlink()
    with pytest.raises(KeyringError, match=r"signs the trust list with SM2: it needs trust-sm2\.key"):
        load_keyring(Settings(mode="production", crypto_profile=NATIONAL, keys_dir=keys))


def test_the_national_profile_needs_its_sm2_session_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys, NATIONAL)
    (keys / "session-sm2.key").unlink()
    with pytest.raises(KeyringError, match=r"signs session tokens with SM2: it needs session-sm2\.key"):
        load_keyring(Settings(mode="production", crypto_profile=NATIONAL, keys_dir=keys))
    # The international profile does without it, and then holds one session key.
    generate_keyring(keys, INTERNATIONAL, add=True)
    keyring = load_keyring(Settings(mode="production", keys_dir=keys))
    assert keyring.session_keys() == (keyring.session_key,)


def test_a_national_only_directory(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys, NATIONAL)
    assert not (keys / "data.key").exists()
    keyring = load_keyring(Settings(mode="production", crypto_profile=NATIONAL, keys_dir=keys))
    assert keyring.data_key is None and not keyring.pii(NATIONAL).dual_index
    with pytest.raises(KeyringError, match=r"international profile needs data\.key and index\.key"):
        load_keyring(Settings(keys_dir=keys))


def test_half_a_pair_is_an_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys)
    (keys / "sm4-data.key").write_text((DEV_KEYS_DIR / "sm4-data.key").read_text())
    with pytest.raises(KeyringError, match=r"sm3-index\.key"):
        read_keyring(keys)


@pytest.mark.parametrize("name", ["sm4-data.key", "sm3-index.key"])
def test_production_refuses_a_copied_national_dev_key(tmp_path: Path, name: str) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys, NATIONAL)
    (keys / name).unlink()
    (keys / name).write_text((DEV_KEYS_DIR / name).read_text())
    with pytest.raises(KeyringError, match="development keys"):
        load_keyring(Settings(mode="production", crypto_profile=NATIONAL, keys_dir=keys))
