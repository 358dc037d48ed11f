"""Raw file formats: label files, test queries and ground truth, including every kind of bad input."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from traffic_retrieval.labels import (
    CR_INSIDE,
    LabelFormatError,
    LabelRecord,
    LineProblem,
    read_ground_truth,
    read_label_file,
    read_label_file_strict,
    read_test_text,
    write_ground_truth,
    write_label_file,
)

GOOD = [
    "pmitevanhx.jpg$white Audi.$This is a white Audi.",
    "090000.jpg$" + ",".join(["0"] * 20 + ["1"]) + "$A female pedestrian. She is in a skirt.",
    "kcbluaihml.jpg$black BESTUNE Sedan.$A black BESTUNE Sedan.",
]


def _write(tmp_path: Path, data: bytes, name: str = "labels.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_round_trip(tmp_path: Path) -> None:
    recs = [LabelRecord(*line.split("$"), line_no=i) for i, line in enumerate(GOOD, start=1)]
    p = tmp_path / "out" / "labels.txt"
    assert write_label_file(p, recs) == 3
    assert p.read_bytes() == ("\n".join(GOOD) + "\n").encode()
    back, problems = read_label_file(p)
    assert problems == []
    assert back == recs
    assert read_label_file_strict(p) == recs


def test_bom_crlf_and_trailing_blank_lines_are_accepted(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + "\r\n".join(GOOD).encode() + b"\r\n\r\n  \n\n"
    recs = read_label_file_strict(_write(tmp_path, data))
    assert [r.name for r in recs] == ["pmitevanhx.jpg", "090000.jpg", "kcbluaihml.jpg"]
    assert recs[0].caption == "This is a white Audi."  # no stray \r
    assert [r.line_no for r in recs] == [1, 2, 3]


def test_every_carriage_return_before_the_line_end_goes(tmp_path: Path) -> None:
    # unix2dos run twice: CR CR LF. A CR left in a caption used to pass the reader and crash the writer.
    p = _write(tmp_path, "\r\r\n".join(GOOD).encode() + b"\r\r\n")
    recs = read_label_file_strict(p)
    assert [r.caption for r in recs] == [line.split("$")[2] for line in GOOD]
    write_label_file(tmp_path / "out.txt", recs)  # writable again
    q = _write(tmp_path, b"A red car.\r\r\nA blue car.\r\r\n", "test_text.txt")
    assert read_test_text(q) == ["A red car.", "A blue car."]
    gt = _write(tmp_path, b"A red car.$a.jpg\r\r\nA blue car.\r\n", "gt.txt")
    assert read_ground_truth(gt) == [("A red car.", ["a.jpg"]), ("A blue car.", [])]


def test_carriage_return_inside_a_line_is_a_line_problem(tmp_path: Path) -> None:
    # A file with old-Mac CR-only line ends is one line: reported, never read as one long record or query.
    p = _write(tmp_path, ("\r".join(GOOD) + "\r").encode())
    recs, problems = read_label_file(p)
    assert recs == [] and [(pr.line_no, pr.reason) for pr in problems] == [(1, CR_INSIDE)]
    p = _write(tmp_path, GOOD[0].encode() + b"\n" + GOOD[2].replace(" Sedan", "\r Sedan").encode() + b"\n")
    recs, problems = read_label_file(p)
    assert [r.line_no for r in recs] == [1] and [(pr.line_no, pr.reason) for pr in problems] == [(2, CR_INSIDE)]
    q = _write(tmp_path, b"A red car.\rA blue car.\r", "test_text.txt")
    with pytest.raises(LabelFormatError, match=re.escape(f"test_text.txt:1: {CR_INSIDE}")):
        read_test_text(q)
    gt = _write(tmp_path, b"A red car.$a.jpg\rA blue car.$b.jpg\n", "gt.txt")
    with pytest.raises(LabelFormatError, match="gt.txt:1: carriage return inside the line"):
        read_ground_truth(gt)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_file_is_refused_as_a_whole(tmp_path: Path, encoding: str) -> None:
    bom = {"utf-16-le": "\ufeff", "utf-16-be": "\ufeff"}.get(encoding, "")  # Notepad writes the BOM
    p = _write(tmp_path, (bom + "\r\n".join(GOOD) + "\r\n").encode(encoding))
    with pytest.raises(LabelFormatError, match=rf"{p.name} is UTF-16 encoded; save it as UTF-8"):
        read_label_file(p)
    with pytest.raises(LabelFormatError, match="is UTF-16 encoded"):
        read_test_text(p)


def test_each_bad_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    lines = [
        GOOD[0].encode(),
        b"",  # blank line in the middle
        b"abc.jpg$white Audi.",  # two fields
        b"abd.jpg$white Audi.$A car.$extra",  # four fields
        b"abe.jpg$white Audi.$   ",  # empty caption
        b"$white Audi.$A car.",  # empty name
        "abf.jpg$white Audi.$A caf\u00e9.".encode("latin-1"),  # not UTF-8
        b"pmitevanhx.jpg$red BMW.$A red BMW.",  # duplicate name
        GOOD[2].encode(),
    ]
    p = _write(tmp_path, b"\n".join(lines) + b"\n")
    recs, problems = read_label_file(p)
    assert [r.name for r in recs] == ["pmitevanhx.jpg", "kcbluaihml.jpg"]
    assert [r.line_no for r in recs] == [1, 9]
    by_line = {pr.line_no: pr for pr in problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8]
    assert by_line[2].reason == "blank line"
    assert "got 2" in by_line[3].reason and "got 4" in by_line[4].reason
    assert by_line[5].reason == "empty caption"
    assert by_line[6].reason == "empty name"
    assert by_line[7].reason == "not valid UTF-8" and "\\xe9" in by_line[7].text
    assert "duplicate image name 'pmitevanhx.jpg' (first on line 1)" in by_line[8].reason
    assert str(by_line[5]).startswith(f"{p}:5: empty caption: ")

    with pytest.raises(LabelFormatError) as err:
        read_label_file_strict(p)
    msg = str(err.value)
    assert f"7 bad line(s) in {p}" in msg
    assert f"{p}:3:" in msg and f"{p}:8:" in msg


def test_strict_message_is_capped(tmp_path: Path) -> None:
    p = _write(tmp_path, b"\n".join(b"x%d.jpg$only two" % i for i in range(25)) + b"\n")
    with pytest.raises(LabelFormatError, match=r"\.\.\. and 15 more"):
        read_label_file_strict(p)


def test_line_problem_str() -> None:
    assert str(LineProblem("a/b.txt", 7, "blank line", "")) == "a/b.txt:7: blank line: ''"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="label file not found: .*nope.txt"):
        read_label_file(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="query file not found"):
        read_test_text(tmp_path / "nope.txt")


def test_empty_file_gives_no_records(tmp_path: Path) -> None:
    assert read_label_file(_write(tmp_path, b"")) == ([], [])
    assert read_label_file(_write(tmp_path, b"\xef\xbb\xbf\r\n\n")) == ([], [])


def test_write_refuses_fields_that_would_break_the_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"caption .*\$"):
        write_label_file(tmp_path / "x.txt", [LabelRecord("a.jpg", "red BMW.", "A $ sign")])
    assert not (tmp_path / "x.txt").exists()  # atomic: nothing half-written


def test_test_text_strips_queries_as_the_official_baseline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The official infer_json.py and the scored solutions read test_text.txt with line.strip().
    queries = ["A black BESTUNE Sedan.", "  This is a grey Chery Sedan.  ", "A female pedestrian.\tShe is.\t"]
    p = _write(tmp_path, b"\xef\xbb\xbf" + "\r\n".join(queries).encode() + b"\r\n\r\n", "test_text.txt")
    with caplog.at_level(logging.WARNING, logger="traffic_retrieval.labels"):
        assert read_test_text(p) == [q.strip() for q in queries]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # one per file, not one per line
    assert "from 2 query line(s)" in warnings[0] and f"(first: {p}:2)" in warnings[0]
    caplog.clear()
    p.write_text("A red car.\nA blue car.\n")
    with caplog.at_level(logging.WARNING, logger="traffic_retrieval.labels"):
        assert read_test_text(p) == ["A red car.", "A blue car."]
    assert caplog.records == []


@pytest.mark.parametrize(
    "data, line, reason",
    [
        (b"A red car.\n\nA blue car.\n", 2, "blank line"),
        (b"A red car.\nA $5 car.\n", 2, "a query must not contain '$'"),
        (b"A red car.\nA caf\xe9.\nA blue car.\n", 2, "not valid UTF-8"),
    ],
)
def test_test_text_errors_name_file_and_line(tmp_path: Path, data: bytes, line: int, reason: str) -> None:
    p = _write(tmp_path, data, "test_text.txt")
    with pytest.raises(LabelFormatError) as err:
        read_test_text(p)
    assert f"{p}:{line}: {reason}" in str(err.value)


def test_ground_truth_round_trip(tmp_path: Path) -> None:
    rows = [("A black BESTUNE Sedan.", ["vehicle_0000001.jpg", "vehicle_0000007.jpg"]), ("A red BMW Bus.", [])]
    p = tmp_path / "gt.txt"
    assert write_ground_truth(p, rows) == 2
    assert p.read_text() == "A black BESTUNE Sedan.$vehicle_0000001.jpg$vehicle_0000007.jpg\nA red BMW Bus.\n"
    assert read_ground_truth(p) == rows


def test_ground_truth_errors(tmp_path: Path) -> None:
    p = _write(tmp_path, b"A car.$a.jpg\nA bus.$$b.jpg\n", "gt.txt")
    with pytest.raises(LabelFormatError, match=r"gt.txt:2: empty image name"):
        read_ground_truth(p)
    p.write_bytes(b"A car.$\nA bus.$b.jpg$\n")  # trailing separators, which the official scorer also takes
    assert read_ground_truth(p) == [("A car.", []), ("A bus.", ["b.jpg"])]
    with pytest.raises(ValueError, match="query"):
        write_ground_truth(tmp_path / "gt2.txt", [("A $ car.", ["a.jpg"])])
