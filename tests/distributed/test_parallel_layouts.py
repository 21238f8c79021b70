"""AdaMoE layer under EP, TP + sequence parallel, expert-TP, TP x EP and DP against one process.

Every layout's outputs, input gradients, router gradients and expert gradients must equal the
single-process run of the same weights and tokens; under EP the all-to-all must carry exactly the
true assignments (never a null one).
"""

from __future__ import annotations

import pytest

from tests.distributed.layouts import (
    padded_load_metric_worker,
    parallel_worker,
    reference_worker,
)
from tests.spawn import run_distributed

pytestmark = pytest.mark.distributed

CASE = dict(
    seed=11,
    seq=8,
    batch=4,
    hidden=16,
    ffn=8,
    num_true=4,
    num_null=4,
    topk=3,
    null_type="identity",
    weight_norm="true_experts",
    aux_coeff=0.05,
    glu=True,
)
# Experts 2 and 3 (EP rank 1 of 2) are never picked: that rank receives zero tokens.
STARVED_CASE = dict(CASE, seed=5, null_type="zero", glu=False, starved_experts=[2, 3])
# EP rank 0's tokens all pick only null experts: it sends nothing and still receives.
ALL_NULL_RANK_CASE = dict(CASE, seed=3, null_type="zero", glu=False, all_null_first_half=True)

TWO_RANK_LAYOUTS = {
    "EP2": dict(ep=2),
    "EP2-allgather": dict(ep=2, dispatcher="allgather"),
    "TP2-SP": dict(tp=2),
    "ETP2": dict(etp=2),
    "DP2": dict(),
}
FOUR_RANK_LAYOUTS = {"EP4": dict(ep=4), "TP2xEP2": dict(tp=2, ep=2)}


@pytest.fixture(scope="module")
def references():
    return run_distributed(reference_worker, 1, CASE, [1, 2, 4])[0]


def assert_all_to_all_ships_true_assignments_only(report, topk, strictly_fewer=True):
    rows_sent = report["all_to_all_rows"]
    assert rows_sent, "expected all-to-all traffic under EP"
    tokens_sent, _ = rows_sent[0]
    probs_sent, _ = rows_sent[1]
    assert tokens_sent == probs_sent == report["true_assignments"]
    if strictly_fewer:
        assert tokens_sent < report["num_tokens"] * topk  # m > 0: fewer rows than T*k


def test_two_rank_layouts_match_single_process(references):
    reports = run_distributed(parallel_worker, 2, CASE, TWO_RANK_LAYOUTS, references)
    for report in reports:
        assert_all_to_all_ships_true_assignments_only(report["EP2"], CASE["topk"])
        assert report["EP2-allgather"]["all_to_all_rows"] == []
        assert report["DP2"]["all_to_all_rows"] == []


def test_four_rank_layouts_match_single_process(references):
    reports = run_distributed(parallel_worker, 4, CASE, FOUR_RANK_LAYOUTS, references)
    for report in reports:
        assert_all_to_all_ships_true_assignments_only(report["EP4"], CASE["topk"])
        assert_all_to_all_ships_true_assignments_only(report["TP2xEP2"], CASE["topk"])


def test_ep_rank_receiving_no_tokens():
    references = run_distributed(reference_worker, 1, STARVED_CASE, [2])[0]
    layouts = {"EP2-alltoall": dict(ep=2), "EP2-allgather": dict(ep=2, dispatcher="allgather")}
    reports = run_distributed(parallel_worker, 2, STARVED_CASE, layouts, references)
    starved = next(r for r in reports if r["EP2-alltoall"]["local_experts"] == [2, 3])
    received = sum(rows for _, rows in starved["EP2-alltoall"]["all_to_all_rows"][:1])
    assert received == 0
    for report in reports:
        assert_all_to_all_ships_true_assignments_only(report["EP2-alltoall"], CASE["topk"])


def test_ep_rank_whose_tokens_are_all_null():
    references = run_distributed(reference_worker, 1, ALL_NULL_RANK_CASE, [2])[0]
    layouts = {"EP2": dict(ep=2)}
    reports = run_distributed(parallel_worker, 2, ALL_NULL_RANK_CASE, layouts, references)
    silent, busy = reports[0]["EP2"], reports[1]["EP2"]
    assert silent["true_assignments"] == 0 and silent["all_to_all_rows"][0][0] == 0
    assert busy["true_assignments"] == busy["num_tokens"] * CASE["topk"]  # no null picks there
    assert_all_to_all_ships_true_assignments_only(silent, CASE["topk"])
    assert_all_to_all_ships_true_assignments_only(busy, CASE["topk"], strictly_fewer=False)


def test_logged_load_under_uneven_padding_is_the_group_mean():
    for logged, expected in run_distributed(padded_load_metric_worker, 2, CASE):
        assert logged == pytest.approx(expected, abs=1e-6)
