"""Cross-region acceptance, from the agreements file kept as versioned data in the repository.

A terminal accepts a card of its own province always, and a card of another province exactly for
the purposes an agreement covering both provinces lists. Regions compare by province: the first
two digits of the GB/T 2260 code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

from crypto.credential import Purpose


class AgreementsError(ValueError):
    """The agreements file is unreadable or inconsistent."""


def province(region: str) -> str:
    """The province part of a region code."""
    return region[:2]


@dataclass(frozen=True, slots=True)
class Agreement:
    """One cooperation agreement."""

    id: str
    name: str
    regions: frozenset[str]
    purposes: frozenset[Purpose]
    scope: str
    provenance: str


@dataclass(frozen=True, slots=True)
class AcceptanceRules:
    """Answers "may a terminal of this region accept a card of that one, for this purpose?"."""

    version: str
    agreements: tuple[Agreement, ...]
    _pairs: frozenset[tuple[str, str, Purpose]]

    @classmethod
    def of(cls, version: str, agreements: Iterable[Agreement]) -> AcceptanceRules:
        """Rules from agreements."""
        listed = tuple(agreements)
        pairs = frozenset(
            (province(here), province(there), purpose)
            for agreement in listed
            for here, there in permutations(agreement.regions, 2)
            for purpose in agreement.purposes
        )
        return cls(version, listed, pairs)

    def accepts(self, terminal_region: str, card_region: str, purpose: Purpose) -> bool:
        """Same province, or an agreement between the two provinces covering purpose."""
        here, there = province(terminal_region), province(card_region)
        return here == there or (here, there, purpose) in self._pairs

    def purposes_between(self, terminal_region: str, card_region: str) -> frozenset[Purpose]:
        """Every purpose a terminal of terminal_region may accept a card of card_region for."""
        if province(terminal_region) == province(card_region):
            return frozenset(Purpose)
        return frozenset(purpose for purpose in Purpose if self.accepts(terminal_region, card_region, purpose))

    def covering(self, region: str) -> list[Agreement]:
        """The agreements a region takes part in."""
        return [
            agreement
            for agreement in self.agreements
            if any(province(r) == province(region) for r in agreement.regions)
        ]


def _agreement(raw: object) -> Agreement:
    if not isinstance(raw, dict):
        raise AgreementsError("each agreement must be an object")
    known = {purpose.label for purpose in Purpose}
    unknown = [label for label in raw.get("purposes", []) if label not in known]
    if unknown:
        raise AgreementsError(f"agreement {raw.get('id', '?')!r}: unknown purposes {unknown}; known: {sorted(known)}")
    try:
        regions = frozenset(str(code) for code in raw["regions"])
        purposes = frozenset(Purpose.from_label(str(label)) for label in raw["purposes"])
        agreement = Agreement(
            id=str(raw["id"]),
            name=str(raw["name"]),
            regions=regions,
            purposes=purposes,
            scope=str(raw.get("scope", "")),
            provenance=str(raw["provenance"]),
        )
    except KeyError as exc:
        raise AgreementsError(f"agreement {raw.get('id', '?')!r}: missing {exc}") from None
    if len(regions) < 2 or not all(len(code) == 6 and code.isascii() and code.isdigit() for code in regions):
        raise AgreementsError(f"agreement {agreement.id!r} needs two or more 6-digit region codes")
    if not purposes:
        raise AgreementsError(f"agreement {agreement.id!r} covers no purpose")
    return agreement


def load_rules(path: Path) -> AcceptanceRules:
    """Read and check the agreements file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AgreementsError(f"cannot read agreements from {path}: {exc}") from None
    agreements = [_agreement(raw) for raw in document.get("agreements", [])]
    ids = [agreement.id for agreement in agreements]
    if len(ids) != len(set(ids)):
        raise AgreementsError("agreement ids must be unique")
    return AcceptanceRules.of(str(document.get("version", "")), agreements)
