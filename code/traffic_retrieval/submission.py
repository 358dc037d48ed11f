"""The submission file: ``{"results": [{"text": str, "image_names": [k names]}, ...]}`` in test_text.txt order.

The official scorer gives no score at all when a text differs from the ground truth at the same index, and it does
not check the list lengths, so :func:`validate_submission` checks everything a valid file needs before it is
written: the texts, in order and character for character, exactly ``k`` unique names per query, and (when the
gallery is known) that every name is a real image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from .fileio import write_json

log = logging.getLogger(__name__)

Results = list[tuple[str, list[str]]]


class SubmissionError(ValueError):
    """A submission does not follow the challenge format; the message names the query index, text and problem."""


def _where(i: int, text: Any) -> str:
    return f"result {i} (text {text!r})" if isinstance(text, str) else f"result {i}"


def _parse_results(obj: Any, source: str = "submission") -> Results:
    """Check the JSON structure only and return ``(text, image_names)`` pairs."""
    if not isinstance(obj, Mapping) or "results" not in obj:
        raise SubmissionError(f"{source}: expected a JSON object with a 'results' list, got {type(obj).__name__}"
                              + (f" with keys {sorted(obj)}" if isinstance(obj, Mapping) else ""))
    items = obj["results"]
    if not isinstance(items, list):
        raise SubmissionError(f"{source}: 'results' must be a list, got {type(items).__name__}")
    out: Results = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise SubmissionError(f"{source}: result {i}: expected an object with 'text' and 'image_names', "
                                  f"got {type(item).__name__}")
        text, names = item.get("text"), item.get("image_names")
        if not isinstance(text, str):
            raise SubmissionError(f"{source}: result {i}: 'text' must be a string, got {type(text).__name__}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SubmissionError(f"{source}: {_where(i, text)}: 'image_names' must be a list of strings")
        out.append((text, list(names)))
    return out


def validate_submission(
    obj: Any, texts: Sequence[str], image_names: Collection[str] | None = None, k: int = 10
) -> None:
    """Raise :class:`SubmissionError` unless ``obj`` is a complete, valid submission for ``texts``.

    Args:
        obj: the parsed JSON object.
        texts: the query texts in test_text.txt order.
        image_names: the gallery file names, or None to skip the membership check.
        k: the exact number of unique names each query must have.
    """
    results = _parse_results(obj)
    names_set = image_names if image_names is None or isinstance(image_names, (set, frozenset)) else set(image_names)
    for i, ((text, names), want) in enumerate(zip(results, texts)):
        if text != want:
            raise SubmissionError(f"{_where(i, text)}: text differs from query {i} {want!r} "
                                  "(the official scorer requires the test_text.txt order, character for character)")
        if len(names) != k:
            raise SubmissionError(f"{_where(i, text)}: has {len(names)} image names, expected exactly {k}")
        if len(set(names)) != len(names):
            dup = next(n for j, n in enumerate(names) if n in names[:j])
            raise SubmissionError(f"{_where(i, text)}: image name {dup!r} appears more than once")
        if names_set is not None:
            unknown = [n for n in names if n not in names_set]
            if unknown:
                raise SubmissionError(f"{_where(i, text)}: image name {unknown[0]!r} is not in the gallery"
                                      + (f" ({len(unknown)} unknown names)" if len(unknown) > 1 else ""))
    if len(results) != len(texts):
        raise SubmissionError(f"submission has {len(results)} results but there are {len(texts)} query texts"
                              + (f"; missing from index {len(results)} ({texts[len(results)]!r})"
                                 if len(results) < len(texts) else ""))


def _as_pairs(results: Sequence[Any]) -> Results:
    """Accept ``(text, names)`` pairs or ``{"text", "image_names"}`` dicts."""
    pairs: Results = []
    for i, r in enumerate(results):
        if isinstance(r, Mapping):
            pairs.append((r.get("text"), list(r.get("image_names", []))))
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            pairs.append((r[0], list(r[1])))
        else:
            raise SubmissionError(f"result {i}: expected (text, image_names) or a dict, got {type(r).__name__}")
    return pairs


def write_submission(
    path: str | os.PathLike,
    results: Sequence[tuple[str, Sequence[str]]] | Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    image_names: Collection[str] | None = None,
    k: int = 10,
) -> None:
    """Validate ``results`` (``(text, names)`` pairs or result dicts) against ``texts`` and write them atomically."""
    obj = {"results": [{"text": t, "image_names": n} for t, n in _as_pairs(results)]}
    validate_submission(obj, texts, image_names, k)
    write_json(path, obj)
    log.info("wrote %d results to %s", len(obj["results"]), path)


def load_submission(path: str | os.PathLike) -> Results:
    """Read a submission file into ``(text, image_names)`` pairs (structure checked; lengths and texts are not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise SubmissionError(f"{path}: not UTF-8 text ({e})") from None
    return _parse_results(obj, source=str(path))
