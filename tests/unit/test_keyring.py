"""Secrets: production refuses the development keys wherever they come from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.security.keyring import KeyringError, generate_keyring, load_keyring, read_keyring
from app.settings import DEV_KEYS_DIR, Settings


def test_development_mode_uses_dev_keys() -> None:
    keyring = load_keyring(Settings(keys_dir=DEV_KEYS_DIR))
    assert len(keyring.data_key) == 32 and len(keyring.index_key) == 32


def test_production_refuses_the_dev_key_directory() -> None:
    with pytest.raises(KeyringError, match="development key directory"):
        load_keyring(Settings(mode="production", keys_dir=DEV_KEYS_DIR))


def test_production_refuses_copied_dev_keys(tmp_path: Path) -> None:
    copy = tmp_path / "keys"
    shutil.copytree(DEV_KEYS_DIR, copy)
    with pytest.raises(KeyringError, match="development keys"):
        load_keyring(Settings(mode="production", keys_dir=copy))


@pytest.mark.parametrize(
    "name", ["data.key", "index.key", "session.pem", "trust.pem", "trust-sm2.key", "session-sm2.key"]
)
def test_production_refuses_a_single_copied_dev_key(tmp_path: Path, name: str) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys)
    shutil.copy(DEV_KEYS_DIR / name, keys / name)
    with pytest.raises(KeyringError, match="development keys"):
        load_keyring(Settings(mode="production", keys_dir=keys))


def test_production_accepts_generated_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys)
    assert oct((keys / "data.key").stat().st_mode & 0o777) == "0o600"
    keyring = load_keyring(Settings(mode="production", keys_dir=keys))
    assert keyring.data_key != read_keyring(DEV_KEYS_DIR).data_key


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keyring(tmp_path)
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        generate_keyring(tmp_path)


@pytest.mark.parametrize("content", ["", "not base64!", "c2hvcnQ="])
def test_bad_symmetric_key_is_a_clear_error(tmp_path: Path, content: str) -> None:
    generate_keyring(tmp_path)
    (tmp_path / "data.key").write_text(content)
    with pytest.raises(KeyringError, match=r"data\.key"):
        read_keyring(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match=r"absent/data\.key"):
        read_keyring(tmp_path / "absent")


@pytest.mark.parametrize("content", ["", "not base64!", "c2hvcnQ=", "//////////////////////////////////////////8="])
@pytest.mark.parametrize("name", ["trust-sm2.key", "session-sm2.key"])
def test_a_bad_sm2_key_is_a_clear_error(tmp_path: Path, content: str, name: str) -> None:
    """Empty, not base64, too short, or a scalar out of range (2^256 - 1)."""
    generate_keyring(tmp_path)
    (tmp_path / name).write_text(content)
    with pytest.raises(KeyringError, match=name.replace(".", r"\.")):
        read_keyring(tmp_path)
