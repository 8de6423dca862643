"""fastrit.data.scoring: exact match, containment (accuracy), SQuAD token F1 and abstention against hand-computed
cases."""

import pytest

from fastrit import data, demo
from fastrit.data import ABSTENTIONS, abstains, contains_answer, exact_match, token_f1


@pytest.mark.parametrize("prediction, answers, em, contains, f1", [
    ("the Eiffel Tower", ["Eiffel Tower!"], True, True, 1.0),  # articles and punctuation do not count
    ("Eiffel Tower in Paris", ["the Eiffel Tower"], False, True, 2 / 3),  # P 2/4, R 2/2
    ("The language of Lumamu is Paboish.", ["Paboish"], False, True, 1 / 3),  # P 1/5, R 1
    ("Tower Eiffel", ["Eiffel Tower"], False, False, 1.0),  # a bag of tokens for F1, contiguous for containment
    ("party", ["art"], False, False, 0.0),  # whole words only
    ("Paris", ["London", "Paris France"], False, False, 2 / 3),  # the best gold answer: P 1, R 1/2
    ("tower tower", ["tower"], False, True, 2 / 3),  # repeats count once per gold occurrence: P 1/2, R 1
    ("New York City", ["York New", "new york"], False, True, 0.8),  # P 2/3, R 1
    ("", ["Paris"], False, False, 0.0),
    ("the", ["an"], True, False, 1.0),  # both normalise to nothing: equal, but an empty answer is never contained
    ("Paris", [], False, False, 0.0),
])
def test_scores_of_hand_computed_cases(prediction, answers, em, contains, f1):
    assert exact_match(prediction, answers) is em
    assert contains_answer(prediction, answers) is contains
    assert token_f1(prediction, answers) == pytest.approx(f1)


def test_f1_is_symmetric_and_at_most_one():
    a, b = "the cat sat on the mat", "a cat on a mat today"
    # "cat sat on mat" and "cat on mat today": cat, on, mat in common, P = R = 3/4
    assert token_f1(a, [b]) == pytest.approx(token_f1(b, [a])) == pytest.approx(2 * 3 / (4 + 4))
    assert 0 <= token_f1("cat cat cat", ["cat dog"]) <= 1


@pytest.mark.parametrize("prediction, expected", [
    ("unknown", True),
    ("Unknown.", True),
    ("The capital of Pobuva is unknown.", True),
    ("I don't know.", True),
    ("I do not know", True),
    ("There is no answer in the passages.", True),
    ("The passages do not say; it is not mentioned.", True),
    ("This is not provided in the context", True),
    ("It cannot be determined from the passages.", True),
    ("Not enough information.", True),
    ("I cannot answer that.", True),
    ("unknowns", False),  # whole words only
    ("Paboish", False),
    ("no", False),
    ("", False),
])
def test_abstention_phrases(prediction, expected):
    assert abstains(prediction) is expected


def test_abstention_list_is_short_normalised_and_has_the_readers_answer():
    assert 3 <= len(ABSTENTIONS) <= 12
    assert all(phrase == data.normalize_answer(phrase) and phrase for phrase in ABSTENTIONS)
    assert data.normalize_answer(demo.ABSTAIN) in ABSTENTIONS
    assert abstains("maybe", phrases=["maybe"]) and not abstains("unknown", phrases=["maybe"])
