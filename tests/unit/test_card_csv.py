"""The generated import files of loadtests/card_csv.py: every row valid, no person or card number twice."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from app.domain.imports.services import CardFileReader
from app.security.pii import PiiCipher
from app.settings import PROJECT_ROOT
from loadtests import card_csv

CIPHER = PiiCipher(os.urandom(32), os.urandom(32))


def generated(cards: int, region: str, seed: int) -> bytes:
    """The file the generator writes."""
    stream = io.StringIO()
    card_csv.write(stream, cards, region, seed)
    return stream.getvalue().encode()


def test_every_generated_row_passes_the_import_checks() -> None:
    reader = CardFileReader(
        io.BytesIO(generated(5000, "510000", 0)), CIPHER, registered_regions={"510000"}, scope={"*"}
    )
    rows = 0
    while (chunk := reader.read_chunk(1000)) is not None:
        assert chunk.rejections == []  # no bad row, and no card number or citizen ID twice (the reader checks)
        rows += len(chunk.rows)
    assert rows == 5000


def test_rows_differ_across_seeds_and_names_are_two_to_four_han_characters() -> None:
    lines = [row.split(",") for seed in (0, 1, 2) for row in generated(3000, "440000", seed).decode().splitlines()[1:]]
    assert len({citizen_id for _, citizen_id, _, _ in lines}) == len(lines)
    assert len({number for *_, number in lines}) == len(lines)
    assert all(region == "440000" and citizen_id.startswith("44") for region, citizen_id, _, _ in lines)
    assert all(re.fullmatch(r"[\u4e00-\u9fff]{2,4}", name) for _, _, name, _ in lines)


def test_the_same_seed_writes_the_same_file() -> None:
    assert generated(100, "510000", 7) == generated(100, "510000", 7)


def test_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.card_csv", "--cards", "3", "--region", "500000", "--seed", "4"],
        cwd=PROJECT_ROOT, capture_output=True, check=True,
    )  # fmt: skip
    lines = result.stdout.decode("utf-8").splitlines()
    assert lines[0] == "region,citizen_id,name,card_number" and len(lines) == 4
    bad = subprocess.run(
        [sys.executable, "-m", "loadtests.card_csv", "--cards", "3", "--region", "05"], cwd=PROJECT_ROOT,
        capture_output=True,
    )  # fmt: skip
    assert bad.returncode == 2 and b"6-digit" in bad.stderr
