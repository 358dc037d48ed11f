"""The people/car rules and the official relevance rule."""

from __future__ import annotations

import pytest

from traffic_retrieval.categories import (
    CATEGORIES,
    PEDESTRIAN_ATTRIBUTES,
    VEHICLE_BRANDS,
    VEHICLE_COLOURS,
    VEHICLE_TYPES,
    attribute_category,
    coded_name,
    format_pedestrian_code,
    is_relevant,
    parse_pedestrian_code,
    split_coded_name,
    text_category,
)


def code(*names: str) -> str:
    """A pedestrian code with the named attributes set."""
    return format_pedestrian_code([int(a in names) for a in PEDESTRIAN_ATTRIBUTES])


REAL_PEOPLE = [
    "A female pedestrian is someone who walks on foot, is between 18 and 60 years old, with her body back to the "
    "camera and has a shoulderbag. She is in a tee shirt with short sleeves.",
    "A walking man who is age 18 or younger, with his body back to the camera and with a backpack. He is wearning "
    "glasses.",
    "A pedestrian who is female is not an adult, with her body facing the camera and with a backpack. She is in a "
    "shirt with short sleeves.",
]
REAL_CARS = [
    "This is a white Audi.", "A yellow BMW.", "An orange Honda.", "This is a Microbus.", "A Hongyan.",
    "This is a grey Chery Sedan.", "A black BESTUNE Sedan.", "An orange Jinbei Microbus.",
    "This is a white Buick Microbus.", "A white Mansory Sedan.", "A red Germany-made Truck.",
    "The white Theme SUV.",  # "The " contains "he " but not the word He
]


def test_constants() -> None:
    assert CATEGORIES == ("car", "people")
    assert len(PEDESTRIAN_ATTRIBUTES) == 21 and PEDESTRIAN_ATTRIBUTES[0] == "Female"
    assert PEDESTRIAN_ATTRIBUTES[-1] == "Skirt&Dress" and PEDESTRIAN_ATTRIBUTES[13] == "ShortSleeve"
    assert len(VEHICLE_COLOURS) == 11 and len(VEHICLE_TYPES) == 6
    assert len(set(VEHICLE_BRANDS)) == len(VEHICLE_BRANDS) >= 40
    assert {"Golden Dragon", "MORRIS-GARAGE", "BESTUNE"} <= set(VEHICLE_BRANDS)


@pytest.mark.parametrize("caption", REAL_PEOPLE)
def test_real_pedestrian_captions_are_people(caption: str) -> None:
    assert text_category(caption) == "people"


@pytest.mark.parametrize("caption", REAL_CARS)
def test_real_vehicle_captions_are_cars(caption: str) -> None:
    assert text_category(caption) == "car"


@pytest.mark.parametrize(
    "caption", ["A man with a backpack.", "WOMAN in a skirt.", "A pedestrian with a hat.", "two men walking",
                "She walks.", "a female with long sleeves", "A person with a backpack.", "A child wearing a hat.",
                "A girl in a red dress.", "A boy with glasses.", "A lady with a handbag.", "people walking",
                "someone carrying a bag", "a cyclist", "she is in a skirt"],
)
def test_shortened_pedestrian_queries_are_people(caption: str) -> None:
    # without "He "/"She " the 4th place's rule alone would send these to the car model
    assert text_category(caption) == "people"


def test_no_vehicle_caption_of_any_brand_colour_and_type_is_people() -> None:
    for brand in VEHICLE_BRANDS:
        for kind in ("", *(" " + t for t in VEHICLE_TYPES)):
            for colour in ("", *(c + " " for c in VEHICLE_COLOURS)):
                caption = f"This is a {colour}{brand}{kind}."
                assert text_category(caption) == "car", caption


def test_attribute_category() -> None:
    assert attribute_category(code("Female", "Age18-60")) == "people"
    assert attribute_category(" " + code() + "\n") == "people"
    for attr in ("white Audi.", "black BESTUNE Sedan.", "grey Golden Dragon Bus.", "red MORRIS-GARAGE.", "Microbus.",
                 "A white Audi."):
        assert attribute_category(attr) == "car", attr
    for attr in ("", "white Audi", "0,1,0", ",".join(["1"] * 22), ",".join(["2"] * 21), "white  Audi.", "$."):
        assert attribute_category(attr) is None, attr


def test_code_round_trip_and_validation() -> None:
    c = code("Female", "Hat", "Skirt&Dress")
    bits = parse_pedestrian_code(c)
    assert bits is not None and sum(bits) == 3 and bits[0] == 1 and bits[7] == 1 and bits[20] == 1
    assert format_pedestrian_code(bits) == c
    assert parse_pedestrian_code("white Audi.") is None
    with pytest.raises(ValueError):
        format_pedestrian_code([0, 1])


def test_is_relevant_official_rule() -> None:
    assert is_relevant("white Audi.", "white Audi.")
    assert not is_relevant("white Audi.", "white Audi Sedan.")
    q = code("Female", "Age18-60", "Backpack")
    assert is_relevant(q, q)
    assert is_relevant(q, code("Female", "Age18-60", "Backpack", "Hat"))  # image has more: still relevant
    assert not is_relevant(q, code("Female", "Age18-60"))  # image lacks the backpack
    assert not is_relevant(code("Age18-60"), code("Female", "Age18-60"))  # gender bit must match (0 vs 1)
    assert is_relevant(code("Age18-60"), code("Age18-60", "Hat"))
    assert not is_relevant(q, "white Audi.") and not is_relevant("white Audi.", q)


def test_coded_names() -> None:
    assert coded_name("car", "vehicle_0000001.jpg") == "car_vehicle_0000001.jpg"
    assert split_coded_name("car_vehicle_0000001.jpg") == ("car", "vehicle_0000001.jpg")
    assert split_coded_name(coded_name("people", "000123.jpg")) == ("people", "000123.jpg")
    for bad in ("vehicle_0000001.jpg", "000123.jpg", "people_", "cars_x.jpg"):
        with pytest.raises(ValueError, match="not a category-coded name"):
            split_coded_name(bad)
    with pytest.raises(ValueError, match="unknown category"):
        coded_name("bike", "x.jpg")
