"""The people/car rules: which category a caption, an attribute or a coded file name belongs to, and relevance.

Two categories, as in the 4th-place solution (one model per category): ``car`` (every vehicle) and ``people``
(pedestrians). The rules here are the single place that decides a category; stages never re-implement them.

Pedestrian attributes are the 21 PA-100K attributes in the challenge's order (index 0 = Female), written in the label
files as 21 comma-separated 0/1 values. A vehicle attribute is text such as ``white Audi.`` (train/val) or
``black BESTUNE Sedan.`` (test).
"""

from __future__ import annotations

import re

CATEGORIES: tuple[str, ...] = ("car", "people")

# PA-100K attribute subset, in the order of the 21 values of a pedestrian attribute code.
PEDESTRIAN_ATTRIBUTES: tuple[str, ...] = (
    "Female",
    "AgeOver60",
    "Age18-60",
    "AgeLess18",
    "Front",
    "Side",
    "Back",
    "Hat",
    "Glasses",
    "HandBag",
    "ShoulderBag",
    "Backpack",
    "HoldObjectsInFront",
    "ShortSleeve",
    "LongSleeve",
    "UpperStride",
    "UpperLogo",
    "UpperPlaid",
    "UpperSplice",
    "LongCoat",
    "Skirt&Dress",
)
FEMALE_INDEX = PEDESTRIAN_ATTRIBUTES.index("Female")

VEHICLE_COLOURS: tuple[str, ...] = (
    "black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow",
)
VEHICLE_TYPES: tuple[str, ...] = ("Bus", "Microbus", "Minivan", "SUV", "Sedan", "Truck")
# A representative brand list in the spelling of the real captions (upper-case and multi-word names included);
# the real data has about 65 brands, whose full list is not published.
VEHICLE_BRANDS: tuple[str, ...] = (
    "Audi", "BMW", "Honda", "Volkswagen", "Toyota", "BESTUNE", "Buick", "Chery", "Jinbei", "Hongyan",
    "Golden Dragon", "Nissan", "Ford", "Hyundai", "Kia", "Mazda", "Chevrolet", "Peugeot", "Citroen", "BYD",
    "Geely", "Changan", "Great Wall", "Haval", "JAC", "Dongfeng", "FAW", "Foton", "Isuzu", "Iveco",
    "Wuling", "Baojun", "Roewe", "Skoda", "Volvo", "Lexus", "Land Rover", "Jeep", "Mitsubishi", "Suzuki",
    "Mercedes-Benz", "Yutong", "King Long", "Higer", "Zhongtong", "Shacman", "Balong Heavy Truck", "MORRIS-GARAGE",
    "China-Moto", "Jiangling", "Hafei", "Chana", "Venucia", "Trumpchi", "Haima", "Zotye", "Landwind", "Lifan",
    "Yuejin", "Sinotruk",
)

_CODE_RE = re.compile(r"[01](?:,[01]){%d}" % (len(PEDESTRIAN_ATTRIBUTES) - 1))
# Vehicle attribute text: words (letters, digits, '-', '&', apostrophes) separated by single spaces, ending with '.'.
_VEHICLE_ATTR_RE = re.compile(r"[A-Za-z][A-Za-z0-9&'\-]*(?: [A-Za-z0-9][A-Za-z0-9&'\-]*)*\.")
# The 4th place's rule (a capitalised "He "/"She " sentence, which every real pedestrian caption has), extended to
# the gender/person words of the real pedestrian captions and the everyday words a user searching for people types
# ("A person with a backpack.", "a girl in a red dress"), as whole words in any case. Vehicle captions ("This is a
# blue BMW Bus.") and brand names never contain them; whole words keep "Mansory"/"Germany"-like names and "Omanian"
# from matching.
_PERSON_WORD_RE = re.compile(
    r"\b(?:"
    r"(?:fe)?males?|wom[ae]n|m[ae]n|pedestrians?|his|her|s?he|him"
    r"|persons?|people|child(?:ren)?|kids?|boys?|girls?|lady|ladies|gentlem[ae]n|guys?|someone|somebody|cyclists?"
    r")\b",
    re.IGNORECASE,
)


def text_category(caption: str) -> str:
    """Category of a caption or query: ``people`` or ``car``.

    Rule: ``people`` if the text contains, in any case, one of the words he, she (the 4th place's test was a
    capitalised "He "/"She "), female(s), male(s), woman/women, man/men, pedestrian(s), his, her, him,
    person(s), people, child/children, kid(s), boy(s), girl(s), lady/ladies, gentleman/gentlemen, guy(s), someone,
    somebody, cyclist(s) (whole words); everything else is ``car``. Every real pedestrian caption has a He/She
    sentence and a gender word, and no vehicle caption has either, so the two tests agree on the real data; the word
    list keeps a query routed correctly when it was shortened or rephrased (e.g. "A man with a backpack.", "A person
    with a red umbrella.").
    """
    if _PERSON_WORD_RE.search(caption):
        return "people"
    return "car"


def parse_pedestrian_code(attribute: str) -> tuple[int, ...] | None:
    """The 21 bits of a pedestrian attribute code, or None if ``attribute`` is not such a code."""
    text = attribute.strip()
    if not _CODE_RE.fullmatch(text):
        return None
    return tuple(int(v) for v in text.split(","))


def format_pedestrian_code(bits: tuple[int, ...] | list[int]) -> str:
    """Inverse of :func:`parse_pedestrian_code`."""
    if len(bits) != len(PEDESTRIAN_ATTRIBUTES) or any(b not in (0, 1) for b in bits):
        raise ValueError(f"a pedestrian code needs {len(PEDESTRIAN_ATTRIBUTES)} values of 0/1, got {list(bits)}")
    return ",".join(str(int(b)) for b in bits)


def attribute_category(attribute: str) -> str | None:
    """Category of an attribute field: ``people`` for a 21-value 0/1 code, ``car`` for vehicle text, else None.

    Vehicle text is one or more words ending with a full stop, e.g. ``white Audi.``, ``black BESTUNE Sedan.``,
    ``Microbus.``; anything else (empty, a code of the wrong length, stray characters) is not recognised.
    """
    if parse_pedestrian_code(attribute) is not None:
        return "people"
    if _VEHICLE_ATTR_RE.fullmatch(attribute.strip()):
        return "car"
    return None


def is_relevant(query_attribute: str, image_attribute: str) -> bool:
    """The official validation relevance rule (Open-TransMind ``track2/test.py``).

    An image is relevant to a query when the attribute strings are equal, or, for pedestrians, when both have the
    same gender bit and every attribute set in the query's code is also set in the image's code (inclusion).
    """
    if query_attribute == image_attribute:
        return True
    q = parse_pedestrian_code(query_attribute)
    im = parse_pedestrian_code(image_attribute)
    if q is None or im is None:
        return False
    if q[FEMALE_INDEX] != im[FEMALE_INDEX]:
        return False
    return all(b for a, b in zip(q, im) if a)


def coded_name(category: str, name: str) -> str:
    """File name that carries its category, ``f"{category}_{name}"`` (the detection stage's links)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return f"{category}_{name}"


def split_coded_name(coded: str) -> tuple[str, str]:
    """Inverse of :func:`coded_name`: ``"car_vehicle_0000001.jpg" -> ("car", "vehicle_0000001.jpg")``.

    Raises:
        ValueError: the name does not start with a known category and an underscore.
    """
    category, sep, name = coded.partition("_")
    if not sep or category not in CATEGORIES or not name:
        raise ValueError(
            f"{coded!r} is not a category-coded name (expected '<category>_<name>' with category in {CATEGORIES})"
        )
    return category, name
