"""Grouped FCFS: the prefill instance's queue and the proxy's placement over instances (pure logic)."""

import pytest
from tokenpool.prefill_svc.prefill_scheduler import MAX_GROUP_SIZE, PrefillGroup, PrefillQueue
from tokenpool.proxy.grouped_fcfs import GroupedFcfsPlacement


def _switch(costs: dict[str, float], default: float = 1.0):
    return lambda model: costs.get(model, default)


def _layout(queue: PrefillQueue) -> list[tuple[str, list[str]]]:
    return [(g.model, g.request_ids) for g in queue.groups()]


def test_queue_rejects_bad_size_and_duplicate_id():
    with pytest.raises(ValueError, match="max_group_size must be >= 1, got 0"):
        PrefillQueue(0)
    q = PrefillQueue()
    q.add("r1", "x", 0.1)
    with pytest.raises(ValueError, match="'r1' is already queued"):
        q.add("r1", "y", 0.1)
    assert len(q) == 1


def test_request_joins_first_group_of_its_model_with_room():
    q = PrefillQueue(max_group_size=2)
    for rid, model in [("r1", "x"), ("r2", "y"), ("r3", "x"), ("r4", "x"), ("r5", "y"), ("r6", "x")]:
        q.add(rid, model, 0.1)
    assert _layout(q) == [("x", ["r1", "r3"]), ("y", ["r2", "r5"]), ("x", ["r4", "r6"])]
    q.remove("r1")  # room opens in the first x group: the next x joins it, not the last one
    q.add("r7", "x", 0.1)
    assert _layout(q) == [("x", ["r3", "r7"]), ("y", ["r2", "r5"]), ("x", ["r4", "r6"])]


def test_ninth_request_of_a_model_opens_a_new_group():
    assert MAX_GROUP_SIZE == 8
    q = PrefillQueue()
    for i in range(9):
        q.add(f"r{i}", "x", 0.1)
    assert [len(g.request_ids) for g in q.groups()] == [8, 1]
    assert len(q) == 9


def test_pop_order_is_group_order_then_arrival_order():
    q = PrefillQueue()
    for rid, model in [("a1", "x"), ("b1", "y"), ("a2", "x"), ("c1", "z"), ("b2", "y")]:
        q.add(rid, model, 0.1)
    assert q.peek_next() == ("a1", "x")
    popped = [q.pop_next() for _ in range(5)]
    assert popped == [("a1", "x"), ("a2", "x"), ("b1", "y"), ("b2", "y"), ("c1", "z")]
    assert q.pop_next() is None and q.peek_next() is None and len(q) == 0


def test_remove_drops_request_and_empty_group():
    q = PrefillQueue()
    q.add("a1", "x", 0.1)
    q.add("b1", "y", 0.2)
    q.add("b2", "y", 0.2)
    assert q.remove("a1") is True
    assert q.remove("a1") is False
    assert q.remove("nope") is False
    assert _layout(q) == [("y", ["b1", "b2"])]
    q.remove("b1")
    q.remove("b2")
    assert q.groups() == [] and len(q) == 0


def test_groups_is_a_snapshot():
    q = PrefillQueue()
    q.add("a1", "x", 0.1)
    snap = q.groups()
    snap[0].request_ids.append("ghost")
    snap.append(PrefillGroup("y", ["g2"]))
    assert _layout(q) == [("x", ["a1"])]


def test_next_other_model():
    q = PrefillQueue(max_group_size=1)
    assert q.next_other_model("x") is None
    q.add("a1", "x", 0.1)
    q.add("a2", "x", 0.1)
    assert q.next_other_model("x") is None
    q.add("b1", "y", 0.1)
    q.add("c1", "z", 0.1)
    assert q.next_other_model("x") == "y"
    assert q.next_other_model("y") == "x"


def test_load_counts_work_and_switches_between_differing_groups():
    q = PrefillQueue(max_group_size=2)
    for rid, model in [("a1", "x"), ("a2", "x"), ("a3", "x"), ("b1", "y")]:
        q.add(rid, model, 0.5)
    sw = _switch({"x": 1.0, "y": 2.0})
    # groups x x y: switches only at y when active on x, at x and y when idle
    assert q.load_seconds("x", sw) == pytest.approx(2.0 + 2.0)
    assert q.load_seconds(None, sw) == pytest.approx(2.0 + 1.0 + 2.0)
    assert PrefillQueue().load_seconds("x", sw) == 0.0


def test_load_if_added_does_not_change_the_queue():
    q = PrefillQueue(max_group_size=2)
    q.add("a1", "x", 0.5)
    sw = _switch({"x": 1.0, "y": 2.0})
    assert q.load_if_added("x", 0.5, "x", sw) == pytest.approx(1.0)  # joins the x group: no switch
    assert q.load_if_added("y", 0.5, "x", sw) == pytest.approx(1.0 + 2.0)  # a new y group
    q.add("a2", "x", 0.5)
    # full: a second x group, but it follows an x group, so no switch is implied
    assert q.load_if_added("x", 0.5, "x", sw) == pytest.approx(1.5)
    assert _layout(q) == [("x", ["a1", "a2"])] and len(q) == 2


def _two_instances():
    """A: three x requests queued (0.1 s each), active on x. B: empty, active on y."""
    p = GroupedFcfsPlacement(["A", "B"])
    sw = _switch({}, default=1.0)
    for i in range(4):
        assert p.place(f"x{i}", "x", 0.1, sw) == "A"
    p.started("x0")
    assert p.active_model("A") == "x" and len(p.queue("A")) == 3
    p.place("y0", "y", 0.1, sw)
    p.started("y0")
    p.finished("y0")
    assert p.active_model("B") == "y" and len(p.queue("B")) == 0
    return p, sw


def test_new_model_goes_where_load_if_added_is_smaller():
    p, sw = _two_instances()
    # A: 0.3 + 0.5 + switch 1.0 = 1.8; B: 0.5 + switch 1.0 = 1.5
    assert p.queue("A").load_if_added("z", 0.5, "x", sw) == pytest.approx(1.8)
    assert p.queue("B").load_if_added("z", 0.5, "y", sw) == pytest.approx(1.5)
    assert p.place("z0", "z", 0.5, sw) == "B"


def test_switch_cost_outweighs_queued_work():
    p, sw = _two_instances()
    # y: A would pay 0.3 + 0.1 + switch 1.0; B is active on y: 0.1.
    assert p.place("y1", "y", 0.1, sw) == "B"
    # x with A's group full: A 0.3 + 0.1 and no switch (x follows x); B 0.1 + 0.1 + switch 1.0.
    p2 = GroupedFcfsPlacement(["A", "B"], max_group_size=3)
    for i in range(3):
        p2.place(f"x{i}", "x", 0.1, sw)
    p2.started("x0")
    p2.place("x3", "x", 0.1, sw)  # joins A's group again (room after x0 started)
    p2.place("b0", "y", 0.1, sw)
    p2.started("b0")
    assert p2.queue("A").load_if_added("x", 0.1, "x", sw) == pytest.approx(0.4)
    assert p2.queue("B").load_if_added("x", 0.1, "y", sw) == pytest.approx(1.1)
    assert p2.place("x4", "x", 0.1, sw) == "A"
    assert _layout(p2.queue("A")) == [("x", ["x1", "x2", "x3"]), ("x", ["x4"])]


def test_same_model_joins_group_even_when_another_instance_is_less_loaded():
    p, _ = _two_instances()
    sw = _switch({"x": 0.0})
    assert p.queue("B").load_if_added("x", 0.1, "y", sw) < p.queue("A").load_if_added("x", 0.1, "x", sw)
    assert p.place("x9", "x", 0.1, sw) == "A"
    assert _layout(p.queue("A")) == [("x", ["x1", "x2", "x3", "x9"])]


def test_group_found_on_a_later_instance_wins_over_least_loaded():
    p = GroupedFcfsPlacement(["A", "B"])
    sw = _switch({})
    p.place("y0", "y", 5.0, sw)  # both empty: tie -> A
    p.place("x0", "x", 5.0, sw)  # A would be 5 + 5 + 2 switches; B: 5 + 1 -> B
    assert p.queue("B").peek_next() == ("x0", "x")
    assert p.place("x1", "x", 0.1, sw) == "B"


def test_full_group_sends_request_to_least_loaded_instance():
    p = GroupedFcfsPlacement(["A", "B"], max_group_size=2)
    sw = _switch({})
    assert [p.place(f"x{i}", "x", 0.1, sw) for i in range(2)] == ["A", "A"]
    assert p.place("x2", "x", 0.1, sw) == "B"  # A's group is full; B is less loaded
    assert p.place("x3", "x", 0.1, sw) == "B"  # joins B's group


def test_ties_go_to_instance_order():
    p = GroupedFcfsPlacement(["B", "A", "C"])
    assert p.place("r0", "x", 0.1, _switch({})) == "B"
    assert p.place("r1", "y", 0.1, _switch({})) == "A"
    assert p.place("r2", "z", 0.1, _switch({})) == "C"


def test_started_and_finished_bookkeeping():
    p = GroupedFcfsPlacement(["A"])
    sw = _switch({})
    p.place("r0", "x", 0.1, sw)
    p.place("r1", "x", 0.1, sw)
    with pytest.raises(ValueError, match="'r0' is already placed"):
        p.place("r0", "x", 0.1, sw)
    p.finished("r1")  # cancelled while queued
    p.finished("r1")  # idempotent
    assert _layout(p.queue("A")) == [("x", ["r0"])]
    p.started("r0")
    assert len(p.queue("A")) == 0 and p.active_model("A") == "x"
    p.finished("r0")
    p.finished("never-placed")
    p.place("r0", "x", 0.1, sw)  # the id is free again once finished
    assert len(p.queue("A")) == 1


def test_placement_rejects_bad_instance_lists():
    with pytest.raises(ValueError, match="at least one"):
        GroupedFcfsPlacement([])
    with pytest.raises(ValueError, match="unique"):
        GroupedFcfsPlacement(["A", "A"])
