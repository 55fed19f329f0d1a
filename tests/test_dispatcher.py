"""The proxy's dispatch per policy, without gRPC: decode placement, static pinning, request-level waits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from tokenpool.proxy.dispatcher import (
    AegaeonDispatcher,
    InstanceLoad,
    RequestLevelDispatcher,
    StaticDispatcher,
    Timing,
    make_dispatcher,
)


@dataclass
class Fake:
    name: str
    load: InstanceLoad = field(default_factory=InstanceLoad)


def loaded(name: str, **by_model: int) -> Fake:
    instance = Fake(name)
    instance.load.by_model.update(by_model)
    return instance


async def pick(dispatcher, model, instances) -> str:
    async with dispatcher.decode_slot(model, instances) as instance:
        return instance.name


def test_aegaeon_decode_joins_a_same_model_batch_with_room():
    d0, d1 = loaded("d0", a=5, b=1), loaded("d1", c=1)
    assert asyncio.run(pick(AegaeonDispatcher(["p0"]), "a", [d0, d1])) == "d0"  # joins despite more load


def test_aegaeon_decode_opens_a_batch_on_the_instance_with_fewest_batches():
    d0, d1, d2 = loaded("d0", a=1, b=1), loaded("d1", c=9), loaded("d2", d=1, e=1)
    assert asyncio.run(pick(AegaeonDispatcher(["p0"]), "z", [d0, d1, d2])) == "d1"
    full = loaded("d0", a=2)
    dispatcher = AegaeonDispatcher(["p0"], max_batch=2)
    assert asyncio.run(pick(dispatcher, "a", [full, loaded("d1", b=1)])) == "d1"  # a's batch is full


def test_the_slot_is_held_while_the_request_lives():
    d0 = Fake("d0")

    async def run():
        async with AegaeonDispatcher(["p0"]).decode_slot("a", [d0]):
            assert d0.load.by_model["a"] == 1
        assert d0.load.total == 0
    asyncio.run(run())


def test_aegaeon_prefill_placement_groups_and_counts_switch_cost():
    dispatcher = AegaeonDispatcher(["p0", "p1"])
    dispatcher.timings.update(a=Timing(0.0, 0.01, 1.0), b=Timing(0.0, 0.01, 1.0))
    p = [Fake("p0"), Fake("p1")]
    assert dispatcher.pick_prefill("r1", "a", 10, p).name == "p0"
    assert dispatcher.pick_prefill("r2", "b", 10, p).name == "p1"  # p0 would pay a switch to b
    assert dispatcher.pick_prefill("r3", "a", 10, p).name == "p0"  # joins a's group
    dispatcher.prefill_done("r1")
    dispatcher.prefill_done("r3")
    assert dispatcher.placement.queue("p0").groups() == []


def test_static_pins_models_and_refuses_too_few_instances():
    dispatcher = StaticDispatcher(["a", "b"], 2, 2)
    d = [Fake("d0"), Fake("d1")]
    assert asyncio.run(pick(dispatcher, "b", d)) == "d1"
    assert dispatcher.pick_prefill("r", "a", 5, [Fake("p0"), Fake("p1")]).name == "p0"
    with pytest.raises(ValueError, match="3 models need at least 3 prefill and decode instances"):
        StaticDispatcher(["a", "b", "c"], 3, 2)


def test_request_level_waits_fcfs_for_an_idle_instance():
    async def run():
        dispatcher = RequestLevelDispatcher()
        d0 = Fake("d0")
        order = []

        async def request(model: str, hold: asyncio.Event):
            async with dispatcher.decode_slot(model, [d0]) as instance:
                order.append((model, instance.name))
                await hold.wait()

        first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(request("a", first))
        await asyncio.sleep(0)
        b = asyncio.create_task(request("b", second))  # waits: d0 serves a
        await asyncio.sleep(0)
        a2 = asyncio.create_task(request("a", third))  # FCFS: behind b, though d0 serves a
        await asyncio.sleep(0.01)
        assert order == [("a", "d0")]
        first.set()
        await a
        await asyncio.sleep(0.01)
        assert order == [("a", "d0"), ("b", "d0")]
        second.set()
        third.set()
        await asyncio.gather(b, a2)
        assert order[-1] == ("a", "d0") and d0.load.total == 0

    asyncio.run(run())


def test_request_level_a_cancelled_waiter_takes_nothing():
    async def run():
        dispatcher = RequestLevelDispatcher()
        d0 = loaded("d0")
        hold = asyncio.Event()

        async def holder():
            async with dispatcher.decode_slot("a", [d0]):
                await hold.wait()

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(pick(dispatcher, "b", [d0]))
        await asyncio.sleep(0.01)
        waiter.cancel()
        hold.set()
        await h
        assert d0.load.total == 0
        assert await pick(dispatcher, "c", [d0]) == "d0"

    asyncio.run(run())


def test_make_dispatcher_names_an_unknown_policy():
    with pytest.raises(ValueError, match="unknown scheduling policy 'fifo'"):
        make_dispatcher("fifo", ["a"], ["p0"], 1)
