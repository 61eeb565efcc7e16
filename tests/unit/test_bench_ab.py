"""`python -m bench.ab`'s variants: what each setting asks for, and a clear refusal of what makes no sense."""

from __future__ import annotations

import pytest

from bench.ab import Variant, parse_variant


def test_a_bare_name_is_the_chain_without_spans() -> None:
    assert parse_variant("full") == Variant("full")


def test_settings_combine() -> None:
    wanted = Variant("before", traced=True, ref="HEAD~1", watched=True)
    assert parse_variant("before:ref=HEAD~1,traced,watched") == wanted
    assert parse_variant("bare:chain=off") == Variant("bare", chain="off")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (":traced", "starts with a name"),
        ("x:sampled", "unknown setting 'sampled'"),
        ("x:chain=half", "chain is full or off"),
        ("x:ref", "ref needs a git revision"),
        ("x:traced=yes", "traced takes no value"),
        ("x:chain=off,traced", "makes no spans"),
    ],
)
def test_a_variant_that_makes_no_sense_is_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_variant(text)
