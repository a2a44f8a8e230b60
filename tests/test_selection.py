"""Which model ships: decided on validation only, and never a fine-tuned model that does not beat
the head-only baseline there."""

import numpy as np
import pytest

from pipeline.search.selection import FINETUNED, HEAD_ONLY, Candidate, decide_shipping, rank
from pipeline.tracking.gate import mcnemar_exact_p


def correct(n_right: int, n: int = 148) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[:n_right] = True
    return out


def test_a_clearly_better_finetuned_model_ships():
    decision = decide_shipping(correct(125), correct(109), significance=0.05)
    assert decision.shipped == FINETUNED
    assert (decision.only_finetuned_right, decision.only_head_only_right) == (16, 0)
    assert decision.p_value == pytest.approx(mcnemar_exact_p(16, 0)) and decision.p_value < 0.05


@pytest.mark.parametrize("finetuned_right", [100, 109, 112])  # worse, equal, better but not significantly
def test_a_finetuned_model_not_significantly_better_on_validation_does_not_ship(finetuned_right):
    decision = decide_shipping(correct(finetuned_right), correct(109), significance=0.05)
    assert decision.shipped == HEAD_ONLY
    assert "head-only model ships" in decision.reason


def test_candidates_rank_by_mean_over_seeds_not_by_one_lucky_run():
    lucky = Candidate(slot=0, params={"k": 1}, val_accuracies=[0.875, 0.625])  # best single run
    steady = Candidate(slot=3, params={"k": 3}, val_accuracies=[0.8125, 0.8125])
    middle = Candidate(slot=5, params={"k": 2}, val_accuracies=[0.75, 0.8125])
    assert [c.slot for c in rank([lucky, middle, steady])] == [steady.slot, middle.slot, lucky.slot]
    assert [c.slot for c in rank([Candidate(7, {}, [0.8]), Candidate(2, {}, [0.8])])] == [2, 7]


def test_configurations_validation_cannot_tell_apart_are_ensembled_not_coin_tossed():
    from pipeline.search.selection import indistinguishable_from_best

    best = Candidate(slot=5, params={"k": 3}, val_accuracies=[0.872, 0.838])  # mean 0.855
    tie = Candidate(slot=7, params={"k": 3}, val_accuracies=[0.851, 0.858])  # 0.0003 behind
    other_depth = Candidate(slot=2, params={"k": 2}, val_accuracies=[0.85, 0.85])  # another cut: cannot join
    clearly_worse = Candidate(slot=0, params={"k": 3}, val_accuracies=[0.80, 0.79])  # > 1 SE (0.029) behind
    ranked = rank([clearly_worse, other_depth, tie, best])
    assert [c.slot for c in indistinguishable_from_best(ranked, n_val=148)] == [5, 7]
    # noise that flips the tie yields the same ensemble
    flipped = rank([Candidate(5, {"k": 3}, [0.845, 0.838]), Candidate(7, {"k": 3}, [0.851, 0.858])])
    assert sorted(c.slot for c in indistinguishable_from_best(flipped, n_val=148)) == [5, 7]
