"""CPU of checking and signing API session tokens, per profile: EdDSA (pyjwt) and SM2 (crypto/jws.py).

    .venv/bin/python -m loadtests.session_token_cost [ROUNDS]

With the development session keys, in this process: an operator token checked (every operator request
pays this), a holder access token checked the first time (later requests find it in the cache) and
from the cache, and an operator token signed. Each figure is the best of 5 rounds of ROUNDS calls.
"""

from __future__ import annotations

import json
import sys
import timeit
import uuid
from collections.abc import Callable

from app.security.keyring import read_keyring
from app.security.pii import INTERNATIONAL, NATIONAL
from app.security.tokens import HOLDER_AUDIENCE, HolderSession, OperatorSession, SessionTokens
from app.settings import DEV_KEYS_DIR
from crypto.keys import b64url_decode

OPERATOR = OperatorSession(uuid.uuid4(), "admin", "admin", ("510000",))
HOLDER = HolderSession(uuid.uuid4(), uuid.uuid4(), bytes(16), "510000", "A" * 43)


def best(call: Callable[[], object], rounds: int) -> float:
    """Microseconds per call, the best of 5 rounds."""
    return min(timeit.repeat(call, number=rounds, repeat=5)) / rounds * 1e6


def measure(tokens: SessionTokens, fresh: SessionTokens, rounds: int) -> dict[str, float]:
    """µs per call of each operation, tokens of `tokens`; `fresh` has the same keys and an empty cache."""
    operator = tokens.issue_operator(OPERATOR, 900)
    holder = tokens.issue_holder(HOLDER, 900)
    tokens.read_holder(holder)
    return {
        "operator token checked": best(lambda: tokens.read_operator(operator), rounds),
        "holder token checked (uncached)": best(lambda: fresh._decode(holder, HOLDER_AUDIENCE), rounds),
        "holder token from the cache": best(lambda: tokens.read_holder(holder), rounds),
        "operator token signed": best(lambda: tokens.issue_operator(OPERATOR, 900), rounds),
    }


def main(rounds: int) -> None:
    """Print the figures of both profiles."""
    keyring = read_keyring(DEV_KEYS_DIR)
    for profile in (INTERNATIONAL, NATIONAL):
        signer, held = keyring.session_signer(profile), keyring.session_keys()
        tokens = SessionTokens(signer, held)
        token = tokens.issue_operator(OPERATOR, 900)
        header = json.loads(b64url_decode(token.split(".")[0]))
        print(f"{profile}: header {header}, an operator token of {len(token)} characters")
        for label, micros in measure(tokens, SessionTokens(signer, held), rounds).items():
            print(f"  {label}: {micros:,.1f} µs")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 400)
