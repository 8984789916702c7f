"""Index lists: parsing the '10 15 23-40' syntax and writing lists back."""

from __future__ import annotations

import pytest

from dinov3_cache.errors import EXIT_USAGE, UsageError
from dinov3_cache.indices import MAX_VOLUME_INDEX, format_ranges, format_some, parse_index_list, runs


def test_parse_index_list_accepts_spaces_commas_and_ranges():
    assert parse_index_list(["10", "15", "23-25"]) == [10, 15, 23, 24, 25]
    assert parse_index_list(["3,1", "1-2"]) == [1, 2, 3]


@pytest.mark.parametrize("tokens, message", [
    (["5-2"], "--verify-indices: range '5-2' runs backwards; write it as 2-5"),
    (["x"], "--verify-indices: 'x' is not an index"),
    ([""], "--verify-indices: '' is not an index"),
    ([str(MAX_VOLUME_INDEX + 1)], "must be between 0 and 999999"),
])
def test_parse_index_list_refuses_bad_tokens(tokens, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as caught:
        parse_index_list(tokens, "--verify-indices")
    assert caught.value.exit_status == EXIT_USAGE


def test_a_bare_string_is_one_token_not_its_characters():
    assert parse_index_list("12") == [12]


def test_ranges_for_people_and_for_schedulers():
    assert runs([8, 0, 1, 2, 5, 7, 2]) == [(0, 2), (5, 5), (7, 8)]
    assert format_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert format_ranges([0, 1, 2, 5, 7, 8], separator=",") == "0-2,5,7-8"
    assert format_ranges([]) == ""


def test_format_some_says_how_many_in_all():
    assert format_some([1, 2, 3], limit=2) == "1, 2, ... (3 in all)"
    assert format_some([1, 2]) == "1, 2"
