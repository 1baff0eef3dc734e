"""XNAT's label cleaning (facts 3.5), character by character."""

from __future__ import annotations

import pytest

from xnatio.xnat.labels import clean_label, is_clean, same_subject


@pytest.mark.parametrize("ch", list("`~@#$%^&*()+=[]{}|\\/?:;',.<> "))
def test_replaced_characters_become_underscore(ch: str) -> None:
    assert clean_label(f"A{ch}B") == "A_B"
    assert not is_clean(f"A{ch}B")


@pytest.mark.parametrize("ch", ["-", "_", '"', "!", "é", "Ü", "中"])
def test_kept_characters(ch: str) -> None:
    assert clean_label(f"A{ch}B") == f"A{ch}B"
    assert is_clean(f"A{ch}B")


def test_examples_from_the_issue() -> None:
    assert clean_label("MR.1") == "MR_1"
    assert clean_label("Study 2 (repeat)") == "Study_2__repeat_"


def test_subjects_match_case_insensitively() -> None:
    assert same_subject("Sub01", "SUB01")
    assert not same_subject("Sub01", "Sub02")
