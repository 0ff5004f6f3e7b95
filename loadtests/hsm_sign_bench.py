"""What an issuer key in a PKCS#11 token costs per credential, beside the in-process key (docs/mipin.md).

    python -m loadtests.hsm_sign_bench            # ~15 s; needs SoftHSM2 (bash scripts/ensure-softhsm)

In one process, on one thread at a time, with a SoftHSM2 token of its own (a temporary
SOFTHSM2_CONF directory, removed at the end):

- calibration: libsodium Ed25519 sign of a credential-sized message (120 bytes);
- one C_Sign through SoftHSM (crypto.hsm, CKM_EDDSA) of the same message;
- one credential (`issue_credential`: CBOR, seal, COSE, Base45) signed in process and in the token;
- a 20-credential bundle as issuance signs it (`app.domain.holders.credentials._sign`): in process
  on the event loop in slices, the token's in one worker thread; wall time per bundle, and how late
  a 1 ms ticker on the same loop ran meanwhile (median, 99th percentile; what a scan arriving then
  would wait behind the bundle), beside the same ticker with nothing signing.

Each figure is the best of 5 rounds (timeit), in µs. The load average is printed before and after:
on a shared machine, compare figures within one run.
"""

from __future__ import annotations

import asyncio
import os
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from app.domain.holders.credentials import _sign
from crypto.credential import Claims, Purpose, issue_credential
from crypto.hsm import Pkcs11Config, Pkcs11SigningKey, Pkcs11Token
from crypto.keys import ALG_EDDSA, PrivateKey, SigningKey, VerifyKey
from crypto.seal import CardRefSeal
from tests.softhsm import ISSUERS, softhsm_tokens

MESSAGE = bytes(range(120))
ROUNDS = 5
REGION = "510000"


@dataclass(frozen=True)
class OnTheLoop:
    """The token's key as if it did not block: `_sign` then calls it on the loop in slices (not what the
    service does; for the comparison only)."""

    key: Pkcs11SigningKey
    alg: ClassVar[int] = ALG_EDDSA
    blocking: ClassVar[bool] = False

    @property
    def public(self) -> bytes:
        return self.key.public

    @property
    def kid(self) -> bytes:
        return self.key.kid

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def verify_key(self, region: str) -> VerifyKey:
        return VerifyKey(public=self.key.public, region=region)


def best_us(work: Callable[[], object], number: int) -> float:
    """The fastest of ROUNDS rounds of number calls, in µs a call."""
    return min(timeit.repeat(work, number=number, repeat=ROUNDS)) / number * 1e6


def claims(count: int) -> list[Claims]:
    now = int(time.time())
    return [
        Claims(os.urandom(16), os.urandom(7), REGION, Purpose.TRANSIT, now + 30 * i, now + 30 * i + 60)
        for i in range(count)
    ]


async def bundle_figures(key: PrivateKey | None, seal: CardRefSeal, bundles: int) -> tuple[float, str]:
    """(best wall µs per 20-bundle, the event loop's lateness: median and 99th percentile of a 1 ms ticker's
    overshoot, in µs) while signing bundles one after another; key None: the ticker alone for as long."""
    gaps: list[float] = []
    running = True

    async def ticker() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    best = float("inf")
    for _ in range(bundles):
        items = claims(20)
        started = time.perf_counter()
        if key is None:
            await asyncio.sleep(0.004)
        else:
            await _sign(key, seal, items)
        best = min(best, time.perf_counter() - started)
    running = False
    await tick
    gaps.sort()
    late = f"p50 {gaps[len(gaps) // 2] * 1e6:.0f} µs, p99 {gaps[int(len(gaps) * 0.99)] * 1e6:.0f} µs"
    return best * 1e6, late


def main() -> None:
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with softhsm_tokens() as softhsm:
        token = Pkcs11Token.open(Pkcs11Config(softhsm.module, ISSUERS, softhsm.pins[ISSUERS]))
        try:
            module_key = token.generate("Ed25519", REGION)
            software_key = SigningKey.generate()
            seal = CardRefSeal.derive(os.urandom(32), "Ed25519", REGION, module_key.kid)
            one = claims(1)[0]
            figures = {
                "calibration: Ed25519 sign in process (libsodium), 120 B": best_us(
                    lambda: software_key.sign(MESSAGE), 2000
                ),
                "Ed25519 sign in SoftHSM2 (C_Sign, CKM_EDDSA), 120 B": best_us(lambda: module_key.sign(MESSAGE), 300),
                "one credential, in-process key": best_us(lambda: issue_credential(software_key, one, seal), 1000),
                "one credential, key in SoftHSM2": best_us(lambda: issue_credential(module_key, one, seal), 300),
            }
            for name, value in figures.items():
                print(f"{name:60s} {value:9.1f} µs")
            _, idle = asyncio.run(bundle_figures(None, seal, 30))
            print(f"{'event loop, nothing signing (4 ms x 30)':60s} late by {idle}")
            keys: tuple[tuple[str, PrivateKey], ...] = (
                ("in-process key", software_key),
                ("key in SoftHSM2, in a thread (as served)", module_key),
                ("key in SoftHSM2, on the loop (for comparison)", OnTheLoop(module_key)),
            )
            for name, key in keys:
                wall, stall = asyncio.run(bundle_figures(key, seal, 30))
                print(
                    f"20-credential bundle, {name}: {wall:.1f} µs ({wall / 20:.1f} µs a credential); "
                    f"event loop late by {stall}"
                )
        finally:
            token.close()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
