"""Reading and writing the challenge's raw text files, with line-level validation.

Formats (see README "Data"):
- label files (``train_label.txt``, ``val_label.txt`` and the cleaned ``fliter_*_labels.txt``): one image per line,
  ``name$attribute$caption`` (exactly three ``$``-separated fields, as the official loader splits them);
- ``test_text.txt``: one query per line, no image name, no ``$``;
- ground truth for the official scorer (``cal_map_json.py``): ``text$img1$img2...``, one line per query.

Files are read as bytes and decoded line by line, so one undecodable line is reported while the others are still read.
A UTF-8 byte-order mark, CRLF line ends (any number of carriage returns before the LF) and trailing blank lines are
accepted (editors add them); a blank line in the middle is reported, because it usually means a line was cut in two, and
so is a carriage return left inside a line (a file with old-Mac CR-only line ends would otherwise read as one line). A
UTF-16 file (Windows Notepad's "Unicode") is refused as a whole. Label fields are kept exactly as written, since the
image names must match files on disk. Queries lose their outer whitespace (``str.strip``, with a warning), as the
official baseline and the scored solutions read ``test_text.txt``, and ground-truth lines too, as the official scorer
reads them: so the submission repeats each query as the scorer spells it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .fileio import atomic_open

log = logging.getLogger(__name__)

SEP = "$"
N_FIELDS = 3  # name, attribute, caption
BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # little- and big-endian
CR_INSIDE = "carriage return inside the line (a file with CR-only line ends?)"
MAX_LISTED_PROBLEMS = 10  # how many problems an exception message spells out before "... and N more"


class LabelFormatError(ValueError):
    """A label/query/ground-truth file breaks its format; the message names file, line and problem."""


@dataclass(frozen=True)
class LabelRecord:
    """One line of a label file. ``line_no`` is 1-based (as editors count) and only used for messages."""

    name: str
    attribute: str
    caption: str
    line_no: int = 0

    def to_line(self) -> str:
        return SEP.join((self.name, self.attribute, self.caption))


@dataclass(frozen=True)
class LineProblem:
    """A line that a lenient reader skipped, with the reason; ``str()`` gives ``file:line: reason: <text>``."""

    path: str
    line_no: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.reason}: {self.text!r}"


def raw_lines(path: str | os.PathLike, what: str) -> list[bytes]:
    """The file's lines as bytes: BOM dropped, the line end (LF with any CRs before it) removed, trailing blank lines
    dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        LabelFormatError: the file is UTF-16 encoded (every line would otherwise be "not valid UTF-8").
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    data = p.read_bytes()
    if data.startswith(UTF16_BOMS):
        raise LabelFormatError(f"{p} is UTF-16 encoded; save it as UTF-8")
    if data.startswith(BOM):
        data = data[len(BOM):]
    # Split on LF only: str.splitlines would also split on \x0b, \x1c, U+2028 ... inside a caption. Every CR before
    # the LF goes: a file converted to CRLF twice ends its lines in CR CR LF, and a CR left in a field cannot be
    # written back.
    lines = [ln.rstrip(b"\r") for ln in data.split(b"\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def decode_line(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def printable_line(raw: bytes) -> str:
    """A printable form of a raw line for messages (bad bytes as \\x escapes)."""
    return raw.decode("utf-8", errors="backslashreplace")


def text_lines(path: str | os.PathLike, what: str, problems: list[LineProblem]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each usable line; an undecodable or blank line, or one with a CR left inside, is
    appended to ``problems`` instead (the checks every format shares)."""
    spath = str(path)
    for i, raw in enumerate(raw_lines(path, what), start=1):
        text = decode_line(raw)
        if text is None:
            problems.append(LineProblem(spath, i, "not valid UTF-8", printable_line(raw)))
        elif not text.strip():
            problems.append(LineProblem(spath, i, "blank line", text))
        elif "\r" in text:
            problems.append(LineProblem(spath, i, CR_INSIDE, text))
        else:
            yield i, text


def read_label_file(path: str | os.PathLike) -> tuple[list[LabelRecord], list[LineProblem]]:
    """Leniently read a ``name$attribute$caption`` file (for the cleaning stages).

    Every bad line becomes a :class:`LineProblem` and is skipped; the good lines are returned in file order.
    Problems: blank line in the middle, bytes that are not UTF-8, a carriage return inside the line, a field count
    other than 3, an empty (or all-blank) field, and an image name seen before (the first occurrence is kept, later
    ones are reported).

    Raises:
        FileNotFoundError: the file does not exist.
        LabelFormatError: the file is UTF-16 encoded.
    """
    spath = str(path)
    records: list[LabelRecord] = []
    problems: list[LineProblem] = []
    seen: dict[str, int] = {}
    for i, text in text_lines(path, "label file", problems):
        fields = text.split(SEP)
        if len(fields) != N_FIELDS:
            reason = f"expected 3 '$'-separated fields (name$attribute$caption), got {len(fields)}"
            problems.append(LineProblem(spath, i, reason, text))
            continue
        name, attribute, caption = fields
        empty = [label for label, v in zip(("name", "attribute", "caption"), fields) if not v.strip()]
        if empty:
            problems.append(LineProblem(spath, i, f"empty {' and '.join(empty)}", text))
            continue
        if name in seen:
            problems.append(LineProblem(spath, i, f"duplicate image name {name!r} (first on line {seen[name]})", text))
            continue
        seen[name] = i
        records.append(LabelRecord(name, attribute, caption, i))
    return records, problems


def format_problems(problems: Sequence[LineProblem | str], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """The first ``limit`` problems, one per line, plus a count of the rest."""
    shown = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more")
    return "\n".join(shown)


def read_label_file_strict(path: str | os.PathLike) -> list[LabelRecord]:
    """Read a label file and fail on any problem (for stages whose input must already be clean).

    Raises:
        FileNotFoundError: the file does not exist.
        LabelFormatError: at least one line is bad; the message lists the first ones as ``file:line: reason``.
    """
    records, problems = read_label_file(path)
    if problems:
        raise LabelFormatError(f"{len(problems)} bad line(s) in {path}:\n{format_problems(problems)}")
    return records


def _check_field(value: str, what: str, where: str) -> None:
    if SEP in value or "\n" in value or "\r" in value:
        raise ValueError(f"{where}: {what} {value!r} contains '$' or a line break and cannot be written")


def write_label_file(path: str | os.PathLike, records: Iterable[LabelRecord]) -> int:
    """Atomically write ``name$attribute$caption`` lines (LF line ends); returns the number of lines."""
    n = 0
    with atomic_open(path) as f:
        for n, rec in enumerate(records, start=1):
            for what, value in (("name", rec.name), ("attribute", rec.attribute), ("caption", rec.caption)):
                _check_field(value, what, f"{path} record {n}")
            f.write(rec.to_line() + "\n")
    return n


def read_test_text(path: str | os.PathLike) -> list[str]:
    """Read ``test_text.txt``: one query per line, without its outer whitespace.

    Whitespace is stripped (``str.strip``) as the official baseline's ``infer_json.py`` and the scored solutions read
    the file, and as the official scorer reads its ground truth, so the submission's texts are the scorer's; one
    warning per file counts the lines that had some. An empty file gives an empty list (the caller decides whether
    that is an error).

    Raises:
        FileNotFoundError: the file does not exist.
        LabelFormatError: the file is UTF-16 encoded; or a blank line in the middle, a line that is not UTF-8, a
            carriage return inside a line, or a ``$`` in a query (``$`` is the ground truth's separator, so such a
            query could never be scored).
    """
    queries: list[str] = []
    problems: list[LineProblem] = []
    padded: list[int] = []  # line numbers of queries with outer whitespace
    for i, text in text_lines(path, "query file", problems):
        query = text.strip()
        if SEP in query:
            problems.append(LineProblem(str(path), i, "a query must not contain '$'", text))
            continue
        if query != text:
            padded.append(i)
        queries.append(query)
    if problems:
        raise LabelFormatError(f"{len(problems)} bad line(s) in {path}:\n{format_problems(problems)}")
    if padded:
        log.warning("%s: leading/trailing whitespace removed from %d query line(s), as the official baseline reads "
                    "them (first: %s:%d)", path, len(padded), path, padded[0])
    return queries


def read_ground_truth(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """Read the official scorer's ground truth: ``text$img1$img2...`` per line -> ``[(text, [img, ...]), ...]``.

    A line with only the text (``text`` or ``text$``) means a query without relevant images. A ``$`` at the end of a
    line is a trailing separator (the official scorer reads it as the name "", which no submission can contain, so
    it scores the same); an empty name anywhere else is an error.

    Raises:
        FileNotFoundError: the file does not exist.
        LabelFormatError: the file is UTF-16 encoded; or a blank or undecodable line in the middle, a carriage return
            inside a line, or an empty text or image name.
    """
    rows: list[tuple[str, list[str]]] = []
    problems: list[LineProblem] = []
    for i, text in text_lines(path, "ground-truth file", problems):
        # The official scorer strips each ground-truth line before splitting it; do the same so that scores agree.
        query, *images = text.strip().split(SEP)
        if images and images[-1] == "":  # a trailing separator
            images.pop()
        if not query.strip():
            problems.append(LineProblem(str(path), i, "empty query text", text))
        elif any(not im.strip() for im in images):
            problems.append(LineProblem(str(path), i, "empty image name", text))
        else:
            rows.append((query, images))
    if problems:
        raise LabelFormatError(f"{len(problems)} bad line(s) in {path}:\n{format_problems(problems)}")
    return rows


def write_ground_truth(path: str | os.PathLike, rows: Iterable[tuple[str, Sequence[str]]]) -> int:
    """Atomically write ``text$img1$img2...`` lines; returns the number of lines."""
    n = 0
    with atomic_open(path) as f:
        for n, (query, images) in enumerate(rows, start=1):
            _check_field(query, "query", f"{path} row {n}")
            for im in images:
                _check_field(im, "image name", f"{path} row {n}")
            f.write(SEP.join([query, *images]) + "\n")
    return n

