"""Submission validation, atomic writing and loading."""

from __future__ import annotations

import json

import pytest

from traffic_retrieval.submission import SubmissionError, load_submission, validate_submission, write_submission

TEXTS = ["This is a white Audi.", "A female pedestrian is someone who walks on foot. She is in a skirt."]
GALLERY = {f"img{i}.jpg" for i in range(20)}


def _names(start: int, k: int = 10) -> list[str]:
    return [f"img{i}.jpg" for i in range(start, start + k)]


def _obj(*lists: list[str], texts=TEXTS) -> dict:
    return {"results": [{"text": t, "image_names": n} for t, n in zip(texts, lists)]}


def test_valid_submission_passes():
    validate_submission(_obj(_names(0), _names(5)), TEXTS, GALLERY)
    validate_submission(_obj(_names(0, 3), _names(5, 3)), TEXTS, None, k=3)


@pytest.mark.parametrize(
    "obj,match",
    [
        ([], "expected a JSON object with a 'results' list"),
        ({"result": []}, "with keys \\['result'\\]"),
        ({"results": {}}, "'results' must be a list"),
        ({"results": ["x"]}, "result 0: expected an object"),
        ({"results": [{"text": 3, "image_names": []}]}, "result 0: 'text' must be a string"),
        ({"results": [{"text": TEXTS[0], "image_names": "img0.jpg"}]}, "result 0 .* must be a list of strings"),
    ],
)
def test_structure_errors(obj, match):
    with pytest.raises(SubmissionError, match=match):
        validate_submission(obj, TEXTS, GALLERY)


def test_content_errors_name_index_text_and_problem():
    with pytest.raises(SubmissionError, match=r"result 1 \(text 'A female.*'\): has 9 image names, expected exactly 10"):
        validate_submission(_obj(_names(0), _names(0, 9)), TEXTS, GALLERY)
    dup = _names(0, 9) + ["img3.jpg"]
    with pytest.raises(SubmissionError, match=r"result 0 .*'img3.jpg' appears more than once"):
        validate_submission(_obj(dup, _names(0)), TEXTS, GALLERY)
    with pytest.raises(SubmissionError, match=r"result 1 .*'img20.jpg' is not in the gallery \(5 unknown names\)"):
        validate_submission(_obj(_names(0), _names(15)), TEXTS, GALLERY)
    swapped = _obj(_names(0), _names(1), texts=TEXTS[::-1])
    with pytest.raises(SubmissionError, match=r"result 0 .*text differs from query 0 'This is a white Audi.'"):
        validate_submission(swapped, TEXTS, GALLERY)
    one_char = _obj(_names(0), _names(1), texts=[TEXTS[0], TEXTS[1].rstrip(".")])
    with pytest.raises(SubmissionError, match="result 1 .*text differs"):
        validate_submission(one_char, TEXTS, GALLERY)
    with pytest.raises(SubmissionError, match=r"1 results but there are 2 .*missing from index 1"):
        validate_submission(_obj(_names(0)), TEXTS, GALLERY)
    with pytest.raises(SubmissionError, match="3 results but there are 2"):
        validate_submission(_obj(_names(0), _names(1), _names(2), texts=TEXTS + ["x"]), TEXTS, GALLERY)


def test_write_then_load_round_trip(tmp_path):
    path = tmp_path / "out" / "infer_json_all.json"
    pairs = [(TEXTS[0], _names(0)), (TEXTS[1], tuple(_names(10)))]
    write_submission(path, pairs, TEXTS, GALLERY)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj == _obj(_names(0), _names(10))
    assert load_submission(path) == [(TEXTS[0], _names(0)), (TEXTS[1], _names(10))]
    assert [p.name for p in path.parent.iterdir()] == ["infer_json_all.json"]  # no temp files left
    # dicts are accepted too
    write_submission(path, obj["results"], TEXTS, GALLERY)
    assert json.loads(path.read_text(encoding="utf-8")) == obj


def test_invalid_submission_is_not_written(tmp_path):
    path = tmp_path / "sub.json"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(SubmissionError, match="has 9 image names"):
        write_submission(path, [(TEXTS[0], _names(0)), (TEXTS[1], _names(0, 9))], TEXTS, GALLERY)
    assert path.read_text(encoding="utf-8") == "old"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_submission(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [\n  {"text": "a",\n', encoding="utf-8")
    with pytest.raises(SubmissionError, match=r"bad.json:3: not valid JSON"):
        load_submission(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"results": [{"text": "a"}]}', encoding="utf-8")
    with pytest.raises(SubmissionError, match=r"wrong.json: result 0 \(text 'a'\): 'image_names' must be a list"):
        load_submission(wrong)
