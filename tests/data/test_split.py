"""Tests for res_unet.data.split: seeded, order-independent, grouped train/validation splits."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from res_unet.core.errors import UserError
from res_unet.data.pairing import Pair
from res_unet.data.split import group_key, group_pairs, split_pairs

LAKE_PATTERN = r"^(.*)_s2cloudless"


def make_pairs(stems: list[str]) -> list[Pair]:
    return [Pair(stem=s, image=Path(f"/img/{s}.jpg"), label=Path(f"/lab/{s}.png"))
            for s in stems]


def stems(pairs: list[Pair]) -> list[str]:
    return [p.stem for p in pairs]


def lake_stems(n_lakes: int) -> list[str]:
    """Lakes with 1 to 3 years each, like the shared lakes data."""
    years = ("2016", "2017", "2018")
    return [f"lake{i:02d}_s2cloudless_{y}" for i in range(n_lakes) for y in years[:1 + i % 3]]


def test_group_key_first_group_whole_match_and_no_match():
    assert group_key("dospat_s2cloudless_2016", re.compile(LAKE_PATTERN)) == "dospat"
    assert group_key("tile3_image_part_007", re.compile(r"^tile\d+")) == "tile3"
    assert group_key("tile3_image_part_007", re.compile(r"^(tile\d+)")) == "tile3"
    assert group_key("other_2016", re.compile(LAKE_PATTERN)) is None
    assert group_key("anything", None) == "anything"


def test_same_seed_same_split_and_seed_matters():
    pairs = make_pairs([f"img{i:03d}" for i in range(60)])
    first = split_pairs(pairs, 0.25, seed=3)
    again = split_pairs(pairs, 0.25, seed=3)
    other = split_pairs(pairs, 0.25, seed=4)
    assert stems(first[1]) == stems(again[1])
    assert stems(first[1]) != stems(other[1])


def test_result_does_not_depend_on_input_order():
    pairs = make_pairs(lake_stems(30))
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    a_train, a_val = split_pairs(pairs, 0.2, 7, LAKE_PATTERN)
    b_train, b_val = split_pairs(shuffled, 0.2, 7, LAKE_PATTERN)
    assert stems(a_train) == stems(b_train)
    assert stems(a_val) == stems(b_val)
    assert stems(a_train) == sorted(stems(a_train))


def test_fraction_exact_for_single_images():
    pairs = make_pairs([f"img{i:03d}" for i in range(100)])
    train, val = split_pairs(pairs, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert set(stems(train)) | set(stems(val)) == set(stems(pairs))
    assert not set(stems(train)) & set(stems(val))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_groups_never_straddle_and_fraction_roughly_right(seed):
    pairs = make_pairs(lake_stems(40))
    train, val = split_pairs(pairs, 0.2, seed, LAKE_PATTERN)
    lake = re.compile(LAKE_PATTERN)
    train_lakes = {lake.match(s).group(1) for s in stems(train)}
    val_lakes = {lake.match(s).group(1) for s in stems(val)}
    assert not train_lakes & val_lakes
    assert len(train) + len(val) == len(pairs)
    # Whole groups of at most 3 images: the share is within one group of the target.
    assert abs(len(val) - 0.2 * len(pairs)) <= 3


def test_unmatched_stems_are_their_own_groups_with_one_warning(capsys):
    pairs = make_pairs([*lake_stems(6), "odd_one", "odd_two"])
    groups = group_pairs(pairs, LAKE_PATTERN)
    err = capsys.readouterr().err
    assert "2 of" in err and "SPLIT_GROUP_PATTERN" in err
    assert len(groups) == 8
    assert [stems(g) for g in groups.values()].count(["odd_one"]) == 1


def test_validation_gets_a_group_and_training_keeps_one():
    pairs = make_pairs(["a_s2cloudless_2016", "a_s2cloudless_2017", "b_s2cloudless_2016"])
    for share in (0.05, 0.5, 0.9):
        train, val = split_pairs(pairs, share, 0, LAKE_PATTERN)
        assert train and val
        assert {s[0] for s in stems(train)}.isdisjoint({s[0] for s in stems(val)})


def test_no_split_keeps_everything_for_training():
    pairs = make_pairs(["b", "a", "c"])
    train, val = split_pairs(pairs, 0.0, 0)
    assert stems(train) == ["a", "b", "c"] and val == []


def test_one_group_with_a_split_is_an_error():
    pairs = make_pairs(["x_s2cloudless_2016", "x_s2cloudless_2017"])
    with pytest.raises(UserError, match="one group"):
        split_pairs(pairs, 0.2, 0, LAKE_PATTERN)
    with pytest.raises(UserError, match="only 1 image"):
        split_pairs(make_pairs(["solo"]), 0.2, 0)


def test_named_validation_groups_are_held_out_whatever_the_seed():
    pairs = make_pairs([f"tile{t}_image_part_{i:03d}" for t in (1, 2, 4, 5) for i in range(3)])
    for seed in (0, 1, 2):
        train, val = split_pairs(pairs, 0.5, seed, r"^(tile\d+)", ["tile4", "tile1"])
        assert {s.split("_")[0] for s in stems(val)} == {"tile1", "tile4"}
        assert {s.split("_")[0] for s in stems(train)} == {"tile2", "tile5"}
        assert len(val) == 6 and stems(val) == sorted(stems(val))
    # Without a pattern the groups are the file stems.
    train, val = split_pairs(pairs, 0.0, 0, None, ["tile2_image_part_001"])
    assert stems(val) == ["tile2_image_part_001"] and len(train) == 11


def test_named_validation_group_missing_or_all_is_one_clear_error():
    pairs = make_pairs([f"tile{t}_image_part_{i:03d}" for t in (1, 2) for i in range(3)])
    with pytest.raises(UserError, match=r"'tile3'.*tile1, tile2.*fix the names"):
        split_pairs(pairs, 0.2, 0, r"^(tile\d+)", ["tile1", "tile3"])
    with pytest.raises(UserError, match="every group"):
        split_pairs(pairs, 0.2, 0, r"^(tile\d+)", ["tile1", "tile2"])
