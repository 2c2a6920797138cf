"""The forgetting study's finer probe measures: option margins, open answers, KL over merged tokens."""
import math

import pytest
import torch

from qadapter_kernels.evaluation import checkers, metrics

DOC = {"question": "What is the chemical symbol of iron?", "options": ["Fe", "Ir", "F", "In"], "target": 0}


def test_option_margin_is_right_minus_best_wrong_in_the_models_own_case_style():
    # Choices per option: as written, lower case ("Fe", "fe", "Ir", "ir", "F", "f", "In", "in").
    as_written = [-1.0, -9.0, -3.0, -9.0, -2.0, -9.0, -4.0, -9.0]
    assert checkers.option_margin(DOC, as_written) == pytest.approx(-1.0 - -2.0)
    lower = [-9.0, -5.0, -9.0, -2.0, -9.0, -6.0, -9.0, -7.0]  # the model writes lower case, and prefers "ir"
    assert checkers.option_margin(DOC, lower) == pytest.approx(-5.0 - -2.0)
    assert checkers.predicted_options(DOC, lower)[0] == 1  # the margin's sign agrees with the pick
    with pytest.raises(ValueError, match="expected 8 log-likelihoods"):
        checkers.option_margin(DOC, lower[:-1])


def test_an_open_answer_is_right_iff_it_names_the_right_option_alone():
    assert checkers.names_only_the_right_option(DOC, "The chemical symbol of iron is Fe.")
    assert checkers.names_only_the_right_option(DOC, "the symbol is fe")  # case ignored
    assert not checkers.names_only_the_right_option(DOC, "It is Fe or maybe In.")  # two options named
    assert not checkers.names_only_the_right_option(DOC, "Iron's symbol is Ir.")
    assert not checkers.names_only_the_right_option(DOC, "Feeling unsure.")  # whole words only: "Fe" is not in "Feeling"
    assert not checkers.names_only_the_right_option(DOC, "")


class _Tokens:
    """A tokenizer's decode / length / special ids over a fixed vocabulary."""

    def __init__(self, vocab):
        self.vocab, self.all_special_ids = vocab, [0]

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_case_folded_classes_merge_tokens_equal_in_lower_case():
    classes = metrics.case_folded_token_classes(_Tokens(["<s>", "The", "the", " Cat", " cat", "THE"]), 7)
    assert classes[1] == classes[2] == classes[5] and classes[3] == classes[4]
    assert len({int(c) for c in classes}) == 4  # <s>, the, cat, and the model's extra id 6


class _Fixed:
    def __init__(self, rows):
        self.rows = rows

    def continuation_distributions(self, pairs):
        return self.rows


def test_token_kl_over_classes_ignores_mass_moved_within_a_class():
    base = torch.tensor([[0.5, 0.3, 0.2]]).log()
    moved = torch.tensor([[0.1, 0.7, 0.2]]).log()  # mass moved from token 0 to token 1
    ((plain, n),) = metrics.token_kl_per_pair(_Fixed([base]), _Fixed([moved]), [None])
    expected = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.7)
    assert n == 1 and plain == pytest.approx(expected, rel=1e-5)
    same_class = torch.tensor([0, 0, 1])
    ((merged, _),) = metrics.token_kl_per_pair(_Fixed([base]), _Fixed([moved]), [None], same_class)
    assert merged == pytest.approx(0.0, abs=1e-6)  # fp32 log-probabilities in; the plain KL is 0.55
