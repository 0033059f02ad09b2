"""Token sizes as people write them (512, 4k, 160k, 1M) and the default distance grid."""

from __future__ import annotations

import pytest

from tasks.sizes import default_points, format_size, parse_points, parse_size


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("512", 512), ("4k", 4_000), ("160k", 160_000), ("1M", 1_000_000), ("1.5k", 1_500), (" 2K ", 2_000), ("0", 0)],
)
def test_parse_size(text, tokens):
    assert parse_size(text) == tokens


@pytest.mark.parametrize("text", ["4q", "", "k", "-1", "1.2345k", "4 k", "1e3", "0x10"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("tokens", "text"),
    [(512, "512"), (4_000, "4k"), (1_500, "1.5k"), (160_000, "160k"), (1_000_000, "1M"), (1024, "1024")],
)
def test_format_size(tokens, text):
    assert format_size(tokens) == text
    assert parse_size(text) == tokens


def test_parse_points_sorts_and_deduplicates():
    assert parse_points("4k,0,1k,1000,16k") == [0, 1_000, 4_000, 16_000]
    with pytest.raises(ValueError, match="empty"):
        parse_points(" , ")
    with pytest.raises(ValueError, match="bad size"):
        parse_points("0,4q")


def test_default_points_double_up_to_the_maximum():
    assert default_points(4_000) == [0, 1_000, 2_000, 4_000]
    assert default_points(5_000) == [0, 1_000, 2_000, 4_000, 5_000]
    assert default_points(160_000) == [0, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 160_000]
    assert default_points(512) == [0, 512]
    assert default_points(0) == [0]
