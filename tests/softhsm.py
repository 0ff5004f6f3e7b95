"""SoftHSM2 tokens of this test run: a temporary SOFTHSM2_CONF directory, removed at the end.

`make test` installs SoftHSM2 (scripts/ensure-softhsm). The module reads SOFTHSM2_CONF when it is first
initialised in the process, so every token the run needs is made at once, before any test opens one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MODULE = Path(os.environ.get("ECARD_TEST_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
# The issuer keys' token, and one that only ever sees wrong PINs.
ISSUERS = "ecard-issuers"
PIN_CHECK = "ecard-pin-check"


@dataclass(frozen=True, slots=True)
class SoftHsm:
    """The run's SoftHSM configuration: module, tokens and their user PINs (one in a file)."""

    module: Path
    directory: Path
    pins: dict[str, str]
    pin_file: Path

    def settings(self, token: str = ISSUERS, **overrides: object) -> dict[str, object]:
        """Settings values that open the token (PIN from the file)."""
        values: dict[str, object] = {
            "pkcs11_module": str(self.module),
            "pkcs11_token": token,
            "pkcs11_pin_file": str(self.pin_file),
        }
        values.update(overrides)
        return values


def _init_token(env: dict[str, str], label: str, pin: str) -> None:
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", secrets.token_hex(8), "--pin", pin],
        check=True,
        env=env,
        capture_output=True,
    )


@contextmanager
def softhsm_tokens() -> Iterator[SoftHsm]:
    """Make the run's tokens in a fresh directory and point SOFTHSM2_CONF at it; undo both afterwards."""
    if not MODULE.is_file() or shutil.which("softhsm2-util") is None:
        raise RuntimeError(f"SoftHSM2 is missing ({MODULE}, softhsm2-util): run `bash scripts/ensure-softhsm`")
    directory = Path(tempfile.mkdtemp(prefix="ecard-softhsm-"))
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        pins = {ISSUERS: secrets.token_hex(6), PIN_CHECK: secrets.token_hex(6)}
        for label, pin in pins.items():
            _init_token(env, label, pin)
        pin_file = directory / "issuers.pin"
        pin_file.write_text(pins[ISSUERS] + "\n")
        pin_file.chmod(0o600)
        yield SoftHsm(MODULE, directory, pins, pin_file)
    finally:
        if before is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = before
        shutil.rmtree(directory, ignore_errors=True)
