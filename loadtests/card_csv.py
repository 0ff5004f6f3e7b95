"""A valid import file of N cards of one region, written fast, for the scale harness and import benchmarks.

`python -m loadtests.card_csv --cards N --region 510000 [--seed S] > cards.csv`

Every row passes the import's checks: a citizen ID with a real birth date and the right check
character, a 9-character card number, a name of 2 to 4 Chinese characters. Rows are distinct within a
file and across seeds (up to 10**8 cards per seed): row i of seed s is the number s * 10**8 + i put
through a fixed permutation, so neither citizen IDs nor card numbers repeat, yet they do not come in
order (the database's indexes see a realistic spread, not an append at the end).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from typing import TextIO

HEADER = "region,citizen_id,name,card_number"
CARDS_PER_SEED = 10**8
# Citizen IDs: county (the region's two-digit province, then 0100 to 9899), birth date (36,500 days from
# 1925, so none in the future) and a 3-digit sequence: 9,800 * 36,500 * 1,000 = 3.6e11 people per province.
_COUNTIES = 9800
_DAYS = 36500
_SEQUENCES = 1000
_PEOPLE = _COUNTIES * _DAYS * _SEQUENCES
_FIRST_DAY = date(1925, 1, 1)
# Card numbers: 9 characters of 34 (no I or O), the first one a letter so none looks like a number.
_CARD_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_CARD_SPACE = 24 * 34**8
# Odd multipliers coprime with the space sizes: k -> (a * k + b) mod M is a permutation of 0..M-1.
_PERSON_STEP, _PERSON_OFFSET = 7_919_000_003, 1_234_567
_CARD_STEP, _CARD_OFFSET = 2_654_435_761, 97_531
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
    "姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
_COMPOUND_SURNAMES = ("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙")
_GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚桂华建国文辉玲红梅鹏飞宇浩然子涵欣怡雨轩思远博文嘉怡俊杰晨阳"


_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"


def _weighted(digits: str, first: int) -> int:
    return sum(int(d) * w for d, w in zip(digits, _WEIGHTS[first:], strict=False))


class CitizenIds:
    """Citizen IDs of one province by number, with the check sum of each part computed once, not per row."""

    def __init__(self, region: str) -> None:
        self._counties = [f"{region[:2]}{100 + county:04d}" for county in range(_COUNTIES)]
        self._births = [f"{_FIRST_DAY + timedelta(days=day):%Y%m%d}" for day in range(_DAYS)]
        self._sequences = [f"{sequence:03d}" for sequence in range(_SEQUENCES)]
        self._county_sums = [_weighted(county, 0) for county in self._counties]
        self._birth_sums = [_weighted(birth, 6) for birth in self._births]
        self._sequence_sums = [_weighted(sequence, 14) for sequence in self._sequences]

    def __call__(self, person: int) -> str:
        """The citizen ID of the person-th person (0 <= person < 3.6e11)."""
        county, rest = divmod(person, _DAYS * _SEQUENCES)
        day, sequence = divmod(rest, _SEQUENCES)
        total = self._county_sums[county] + self._birth_sums[day] + self._sequence_sums[sequence]
        return self._counties[county] + self._births[day] + self._sequences[sequence] + _CHECK[total % 11]


_PAIRS = [a + b for a in _CARD_ALPHABET for b in _CARD_ALPHABET]


def card_number(card: int) -> str:
    """The card-th card number (0 <= card < 24 * 34**8)."""
    head, rest = divmod(card, 34**8)
    high, low = divmod(rest, 34**4)
    return (
        _CARD_ALPHABET[10 + head]
        + _PAIRS[high // 1156]
        + _PAIRS[high % 1156]
        + _PAIRS[low // 1156]
        + _PAIRS[low % 1156]
    )


def name(rng: random.Random) -> str:
    """A plausible name of 2 to 4 characters: a surname (sometimes compound) and one or two given characters."""
    surname = rng.choice(_COMPOUND_SURNAMES) if rng.random() < 0.02 else rng.choice(_SURNAMES)
    given = "".join(rng.choices(_GIVEN, k=1 if rng.random() < 0.3 else 2))
    return surname + given


def rows(cards: int, region: str, seed: int) -> Iterator[str]:
    """The file's data lines, without their line ends."""
    if not 0 <= cards <= CARDS_PER_SEED:
        raise ValueError(f"at most {CARDS_PER_SEED} cards per seed")
    rng = random.Random(seed)
    citizen_id = CitizenIds(region)
    for i in range(cards):
        k = seed * CARDS_PER_SEED + i
        person = (_PERSON_STEP * k + _PERSON_OFFSET) % _PEOPLE
        card = (_CARD_STEP * k + _CARD_OFFSET) % _CARD_SPACE
        yield f"{region},{citizen_id(person)},{name(rng)},{card_number(card)}"


def write(stream: TextIO, cards: int, region: str, seed: int) -> None:
    """Write the header and the rows, a block of lines per write."""
    stream.write(HEADER + "\n")
    block: list[str] = []
    for row in rows(cards, region, seed):
        block.append(row)
        if len(block) == 10_000:
            stream.write("\n".join(block) + "\n")
            block.clear()
    if block:
        stream.write("\n".join(block) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command line: write the file to standard output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, required=True, help="rows to write")
    parser.add_argument("--region", required=True, help="6-digit region code of every row, e.g. 510000")
    parser.add_argument("--seed", type=int, default=0, help="another seed gives other people and card numbers")
    args = parser.parse_args(argv)
    if len(args.region) != 6 or not args.region.isdigit() or args.region[0] == "0":
        parser.error("--region must be a 6-digit GB/T 2260 code")
    if not 0 <= args.seed < 1000:
        parser.error("--seed must be between 0 and 999")
    sys.stdout.reconfigure(encoding="utf-8", newline="\n")  # type: ignore[union-attr]
    write(sys.stdout, args.cards, args.region, args.seed)


if __name__ == "__main__":
    main()
