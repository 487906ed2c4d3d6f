"""Tests for res_unet.core.errors: the words of one-line messages."""

from res_unet.core.errors import either, first_line, listing


def test_either_joins_alternatives():
    assert either(["a"]) == "a"
    assert either(["a", "b"]) == "a or b"
    assert either(["a", "b", "c"]) == "a, b or c"


def test_listing_shows_at_most_so_many_then_counts_the_rest():
    assert listing(["a", "b"], 3) == "a, b"
    assert listing(["a", "b", "c"], 3) == "a, b, c"
    assert listing(["a", "b", "c", "d", "e"], 3) == "a, b, c, ... and 2 more"
    assert listing([1, 2.5, None], 8) == "1, 2.5, None"


def test_first_line_of_an_exception():
    assert first_line(ValueError("  bad value \nsecond line")) == "bad value"
    assert first_line(OSError("\n\n  truncated file\nmore")) == "truncated file"
    assert first_line(KeyError("name")) == "'name'"
    assert first_line(ValueError("x" * 300)) == "x" * 200
    assert first_line(ValueError("x" * 300), most=120) == "x" * 120
    assert first_line(ValueError("x" * 300), most=None) == "x" * 300
    assert first_line(IndexError()) == "IndexError"
    assert first_line(OSError(" \n "), empty="corrupt record") == "corrupt record"
