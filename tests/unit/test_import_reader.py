"""The import file reader without a database: line numbers, BOM, whole-file errors, masking, job visibility."""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.cards.citizen_id import check_character
from app.domain.imports.services import (
    CardFileReader,
    CsvRecords,
    ImportFileError,
    PreparedRow,
    job_visible,
    remove_stale_uploads,
    report_card_number,
)
from app.security.pii import PiiCipher

CIPHER = PiiCipher(os.urandom(32), os.urandom(32))
FIRST17 = "51000019900101123"
CITIZEN_ID = FIRST17 + check_character(FIRST17)


def records(text: str) -> list[tuple[int, list[str]]]:
    """Every record of a file after its header, with its line."""
    reader = CsvRecords(io.BytesIO(text.encode()))
    found = []
    while (record := reader.next()) is not None:
        found.append(record)
    return found


def test_records_carry_the_line_they_start_on() -> None:
    text = 'region,citizen_id,name,card_number\r\n\r\na,b,c,d\r\n"x\r\ny",b,c,d\r\n\r\ne,f,g,h'
    assert records(text) == [(3, ["a", "b", "c", "d"]), (4, ["x\r\ny", "b", "c", "d"]), (7, ["e", "f", "g", "h"])]


def test_a_bom_and_any_column_order_and_case_are_accepted() -> None:
    reader = CsvRecords(io.BytesIO("\ufeffCard_Number, Name ,region,citizen_id,extra\n".encode()))
    assert reader.columns == {"region": 2, "citizen_id": 3, "name": 1, "card_number": 0}
    assert reader.width == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"region,citizen_id,name\n", "missing: card_number"),
        (b"region,citizen_id,name,card_number\n" + b"x" * 5000 + b"\n", "line 2 is longer than 4096 bytes"),
        # An unclosed quote does not swallow the file into memory: the field limit stops it.
        (b'region,citizen_id,name,card_number\na,"b\n' + (b"x" * 4000 + b"\n") * 40, r"malformed CSV \(field larger"),
    ],
)
def test_a_file_that_is_not_a_card_file_is_refused(content: bytes, message: str) -> None:
    with pytest.raises(ImportFileError, match=message):
        reader = CsvRecords(io.BytesIO(content))
        while reader.next() is not None:
            pass


def test_a_valid_row_is_encrypted_and_nothing_clear_is_kept() -> None:
    content = f"region,citizen_id,name,card_number\n510000,{CITIZEN_ID.lower()},张三,a12345678\n".encode()
    reader = CardFileReader(io.BytesIO(content), CIPHER, registered_regions={"510000"}, scope={"*"})
    chunk = reader.read_chunk(10)
    assert chunk is not None and chunk.rejections == []
    [row] = chunk.rows
    assert isinstance(row, PreparedRow)
    assert (row.line, row.region, row.card_number) == (2, "510000", "A12345678")
    assert CIPHER.decrypt(row.citizen_id_encrypted, "persons.citizen_id") == CITIZEN_ID
    assert CIPHER.decrypt(row.name_encrypted, "persons.name") == "张三"
    assert chunk.bytes_processed == len(content)
    assert reader.read_chunk(10) is None


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("A123", "****"),
        ("A1234", "A1*34"),
        ("A12345", "A1**45"),
        (CITIZEN_ID, CITIZEN_ID[:2] + "*" * 14 + CITIZEN_ID[-2:]),
        ("=HYPERLINK(1)", "HY******K1"),
        ("张三", ""),
    ],
)
def test_malformed_card_numbers_are_masked_in_the_report(raw: str, shown: str) -> None:
    assert report_card_number(raw) == shown


@given(st.text(max_size=100))
def test_a_masked_card_number_shows_at_most_four_characters_and_no_formula(raw: str) -> None:
    shown = report_card_number(raw)
    assert len(shown.replace("*", "")) <= 4
    assert len(shown) <= 32
    assert all(char.isascii() and (char.isalnum() or char == "*") for char in shown)


@pytest.mark.parametrize(
    ("job", "operator", "visible"),
    [
        (["510000"], ["510000"], True),
        (["510000"], ["510000", "500000"], True),
        (["510000", "500000"], ["510000"], False),
        (["500000"], ["510000"], False),
        (["*"], ["510000", "500000"], False),
        (["*"], ["*"], True),
        (["510000"], ["*"], True),
    ],
)
def test_a_job_is_visible_to_operators_whose_regions_cover_it(
    job: list[str], operator: list[str], visible: bool
) -> None:
    assert job_visible(job, operator) is visible


def test_stale_uploads_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    stale, fresh, other = tmp_path / "old.csv", tmp_path / "new.csv", tmp_path / "keep.txt"
    for path in (stale, fresh, other):
        path.write_text("region,citizen_id,name,card_number\n")
    seven_hours_ago = time.time() - 7 * 3600
    os.utime(stale, (seven_hours_ago, seven_hours_ago))
    os.utime(other, (seven_hours_ago, seven_hours_ago))
    assert remove_stale_uploads(tmp_path, timedelta(hours=6)) == 1
    assert not stale.exists() and fresh.exists() and other.exists()
    assert remove_stale_uploads(tmp_path / "missing", timedelta(hours=6)) == 0
