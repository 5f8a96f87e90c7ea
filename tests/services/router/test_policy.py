"""Routing policy pieces, each on its own: filters, scorers, picker, policy, local-prefill rule."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from common.config import RouterConfig
from common.coord.worker_info import WorkerInfo
from services.router.policy import (
    AcceptingWork,
    FreeBlocksScorer,
    HasRole,
    HasRoom,
    LoadScorer,
    NotExcluded,
    Picker,
    PrefixHitScorer,
    RoutingPolicy,
    RoutingRequest,
    SameModel,
)

MODEL = "smollm2"


def worker(worker_id: str, role: str = "decode", **live: object) -> WorkerInfo:
    """An idle, empty worker with 100 blocks unless ``live`` says otherwise."""
    fields: dict[str, object] = {"total_blocks": 100, "free_blocks": 100, "model": MODEL}
    fields.update(live)
    return WorkerInfo(worker_id=worker_id, role=role, grpc_address=f"{worker_id}:50051", **fields)


def request(**overrides: object) -> RoutingRequest:
    """A 64-token prompt (4 blocks of 16) that needs 10 blocks in all, nothing cached, nothing excluded."""
    fields: dict[str, object] = {
        "model": MODEL,
        "num_prompt_tokens": 64,
        "num_blocks_needed": 10,
        "num_prompt_blocks": 4,
    }
    fields.update(overrides)
    return RoutingRequest(**fields)


# ---------------------------------------------------------------------------------------------- request


def test_request_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        request(num_blocks_needed=-1)
    with pytest.raises(ValueError):
        request(prefix_hits={"a": -1})


def test_hits_on_defaults_to_zero_and_caps_at_prompt_blocks() -> None:
    req = request(prefix_hits={"a": 9, "b": 2})
    assert (req.hits_on(worker("a")), req.hits_on(worker("b")), req.hits_on(worker("c"))) == (4, 2, 0)


# ---------------------------------------------------------------------------------------------- filters


def test_accepting_work_rejects_draining() -> None:
    check = AcceptingWork()
    assert check(worker("a"), request()) is True
    assert check(worker("a", draining=True), request()) is False
    assert check.name == "accepting"


def test_same_model_is_exact() -> None:
    check = SameModel()
    assert check(worker("a"), request()) is True
    assert check(worker("a", model="llama"), request()) is False
    assert check.name == "same_model"


def test_has_role() -> None:
    assert HasRole("decode")(worker("a", "decode"), request()) is True
    assert HasRole("decode")(worker("a", "prefill"), request()) is False
    assert HasRole("prefill")(worker("a", "prefill"), request()) is True
    assert HasRole("prefill").name == "role"


@pytest.mark.parametrize(("free", "fits"), [(9, False), (10, True), (11, True)])
def test_has_room_decode_needs_prompt_plus_new_tokens(free: int, fits: bool) -> None:
    assert HasRoom("decode")(worker("a", free_blocks=free), request(num_blocks_needed=10)) is fits


@pytest.mark.parametrize(("free", "fits"), [(3, False), (4, True)])
def test_has_room_prefill_needs_only_the_prompt(free: int, fits: bool) -> None:
    req = request(num_prompt_blocks=4, num_blocks_needed=10)
    assert HasRoom("prefill")(worker("a", "prefill", free_blocks=free), req) is fits


def test_has_room_does_not_count_cached_blocks_twice() -> None:
    req = request(num_blocks_needed=10, prefix_hits={"a": 4})
    assert HasRoom("decode")(worker("a", free_blocks=9), req) is False


def test_not_excluded() -> None:
    req = request(exclude=frozenset({"a"}))
    assert NotExcluded()(worker("a"), req) is False
    assert NotExcluded()(worker("b"), req) is True


# ---------------------------------------------------------------------------------------------- scorers


def test_load_scorer_relative_to_busiest() -> None:
    a, b, c = worker("a", running=2, waiting=2), worker("b", running=1, waiting=1), worker("c")
    pool = [a, b, c]
    assert [LoadScorer()(w, request(), pool) for w in pool] == [0.0, 0.5, 1.0]


def test_load_scorer_all_idle_is_one() -> None:
    pool = [worker("a"), worker("b")]
    assert [LoadScorer()(w, request(), pool) for w in pool] == [1.0, 1.0]


def test_load_scorer_empty_candidates_stays_in_range() -> None:
    assert LoadScorer()(worker("a"), request(), []) == 1.0
    assert LoadScorer()(worker("a", running=3), request(), []) == 0.0


def test_load_scorer_worker_busier_than_candidates_is_zero() -> None:
    assert LoadScorer()(worker("a", waiting=8), request(), [worker("b", waiting=2)]) == 0.0


@pytest.mark.parametrize(("free", "total", "score"), [(0, 100, 0.0), (25, 100, 0.25), (100, 100, 1.0), (0, 0, 0.0)])
def test_free_blocks_scorer(free: int, total: int, score: float) -> None:
    assert FreeBlocksScorer()(worker("a", free_blocks=free, total_blocks=total), request(), []) == score


@pytest.mark.parametrize(("hits", "score"), [(0, 0.0), (1, 0.25), (4, 1.0), (7, 1.0)])
def test_prefix_hit_scorer(hits: int, score: float) -> None:
    req = request(num_prompt_blocks=4, prefix_hits={"a": hits})
    assert PrefixHitScorer()(worker("a"), req, []) == score


def test_prefix_hit_scorer_zero_prompt_blocks() -> None:
    req = request(num_prompt_tokens=0, num_prompt_blocks=0, prefix_hits={"a": 3})
    assert PrefixHitScorer()(worker("a"), req, []) == 0.0
    assert PrefixHitScorer()(worker("b"), request(), []) == 0.0


# ---------------------------------------------------------------------------------------------- picker


def test_picker_none_when_no_candidates() -> None:
    assert Picker([(LoadScorer(), 1.0)]).pick([], request()) is None


def test_picker_rejects_negative_or_nan_weights() -> None:
    with pytest.raises(ValueError):
        Picker([(LoadScorer(), -1.0)])
    with pytest.raises(ValueError):
        Picker([(LoadScorer(), float("nan"))])


def test_changing_weights_flips_the_choice() -> None:
    # "busy" holds the whole prompt in cache but is loaded; "idle" has nothing cached.
    busy, idle = worker("busy", running=4), worker("idle")
    req = request(prefix_hits={"busy": 4})
    pool = [busy, idle]
    cache_first = Picker([(LoadScorer(), 1.0), (PrefixHitScorer(), 2.0)])
    load_first = Picker([(LoadScorer(), 3.0), (PrefixHitScorer(), 2.0)])
    assert cache_first.pick(pool, req) is busy  # 0 + 2 > 1 + 0
    assert load_first.pick(pool, req) is idle  # 3 + 0 > 0 + 2


def test_totals_and_scores_are_reported() -> None:
    picker = Picker([(LoadScorer(), 1.0), (FreeBlocksScorer(), 0.5)])
    w = worker("a", free_blocks=50)
    assert picker.scores(w, request(), [w]) == {"load": 1.0, "free_blocks": 0.5}
    assert picker.total(w, request(), [w]) == 1.25


def test_ties_go_round_robin_in_id_order() -> None:
    picker = Picker([(LoadScorer(), 1.0)])
    pool = [worker("c"), worker("a"), worker("b")]
    picks = [picker.pick(pool, request()).worker_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_ties_spread_evenly_and_ignore_lower_scores() -> None:
    picker = Picker([(LoadScorer(), 1.0)])
    pool = [worker("a"), worker("b"), worker("c"), worker("busy", running=5)]
    counts = Counter(picker.pick(pool, request()).worker_id for _ in range(30))
    assert counts == {"a": 10, "b": 10, "c": 10}


def test_tie_break_state_is_per_instance() -> None:
    pool = [worker("a"), worker("b")]
    first, second = Picker([(LoadScorer(), 1.0)]), Picker([(LoadScorer(), 1.0)])
    first.pick(pool, request())
    assert second.pick(pool, request()).worker_id == "a"


def test_near_equal_totals_count_as_ties() -> None:
    # 0.1 + 0.2 != 0.3 in floats; the picker must still treat them as equal.
    picker = Picker([(FreeBlocksScorer(), 1.0), (PrefixHitScorer(), 1.0)])
    a = worker("a", free_blocks=10, total_blocks=100)  # 0.1 + 0.2
    b = worker("b", free_blocks=30, total_blocks=100)  # 0.3 + 0.0
    req = request(num_prompt_blocks=10, prefix_hits={"a": 2})
    assert [picker.pick([a, b], req).worker_id for _ in range(2)] == ["a", "b"]


# ---------------------------------------------------------------------------------------------- policy


def snapshot() -> list[WorkerInfo]:
    return [
        worker("d-good"),
        worker("d-draining", draining=True),
        worker("d-full", free_blocks=5),
        worker("d-failed"),
        worker("d-other-model", model="llama"),
        worker("p-good", "prefill", free_blocks=4),
        worker("p-full", "prefill", free_blocks=3),
    ]


def test_pick_decode_never_picks_unfit_workers() -> None:
    policy = RoutingPolicy(RouterConfig())
    req = request(exclude=frozenset({"d-failed"}))
    picks = {policy.pick_decode(snapshot(), req).worker_id for _ in range(10)}
    assert picks == {"d-good"}


def test_pick_prefill_only_considers_prefill_workers_with_room_for_the_prompt() -> None:
    policy = RoutingPolicy(RouterConfig())
    assert {policy.pick_prefill(snapshot(), request()).worker_id for _ in range(10)} == {"p-good"}


def test_pick_returns_none_when_nothing_fits() -> None:
    policy = RoutingPolicy(RouterConfig())
    req = request(exclude=frozenset({"d-good", "d-failed", "p-good"}))
    assert policy.pick_decode(snapshot(), req) is None
    assert policy.pick_prefill(snapshot(), req) is None
    assert policy.pick_decode([], request()) is None


def test_pick_decode_follows_prefix_cache_with_default_weights() -> None:
    policy = RoutingPolicy(RouterConfig())
    cold, warm = worker("cold"), worker("warm", running=1, free_blocks=80)
    # cold: 1 + 1 + 0 = 2; warm: 0 + 0.8 + 2 * 0.75 = 2.3
    assert policy.pick_decode([cold, warm], request(prefix_hits={"warm": 3})) is warm


def test_pick_decode_follows_load_when_load_weight_dominates() -> None:
    policy = RoutingPolicy(RouterConfig(weight_load=5.0))
    cold, warm = worker("cold"), worker("warm", running=1, free_blocks=80)
    assert policy.pick_decode([cold, warm], request(prefix_hits={"warm": 3})) is cold


def test_decode_and_prefill_tie_breaks_are_independent() -> None:
    policy = RoutingPolicy(RouterConfig())
    pool = [worker("d1"), worker("d2"), worker("p1", "prefill"), worker("p2", "prefill")]
    picks = [
        (policy.pick_decode(pool, request()).worker_id, policy.pick_prefill(pool, request()).worker_id)
        for _ in range(2)
    ]
    assert picks == [("d1", "p1"), ("d2", "p2")]


def test_explain_reports_filters_and_scores() -> None:
    policy = RoutingPolicy(RouterConfig())
    verdicts = {v.worker_id: v for v in policy.explain("decode", snapshot(), request(exclude=frozenset({"d-failed"})))}
    assert set(verdicts) == {w.worker_id for w in snapshot()}
    good = verdicts["d-good"]
    assert good.eligible and good.scores == {"load": 1.0, "free_blocks": 1.0, "prefix_hits": 0.0}
    assert good.total == 2.0
    assert verdicts["d-draining"].filters["accepting"] is False
    assert verdicts["d-full"].filters["has_room"] is False
    assert verdicts["d-failed"].filters["not_excluded"] is False
    assert verdicts["d-other-model"].filters["same_model"] is False
    assert verdicts["p-good"].filters["role"] is False
    assert verdicts["d-full"].scores is None and verdicts["d-full"].total is None


def test_explain_does_not_advance_tie_break() -> None:
    policy = RoutingPolicy(RouterConfig())
    pool = [worker("a"), worker("b")]
    policy.explain("decode", pool, request())
    assert policy.pick_decode(pool, request()).worker_id == "a"


def test_snapshot_may_be_any_iterable() -> None:
    policy = RoutingPolicy(RouterConfig())
    by_id = {w.worker_id: w for w in snapshot()}
    req = request(exclude=frozenset({"d-failed"}))
    assert policy.pick_decode(iter(by_id.values()), req).worker_id == "d-good"


def test_policy_does_not_mutate_inputs() -> None:
    workers = snapshot()
    before = [replace(w) for w in workers]
    RoutingPolicy(RouterConfig()).pick_decode(workers, request())
    assert workers == before
