"""The bounded mailbox: capacity, FIFO order, close semantics, waiting and cancellation."""

from __future__ import annotations

import anyio
import pytest
from anyio import ClosedResourceError, EndOfStream, WouldBlock

from runtime._mailbox import Mailbox


def test_put_nowait_refuses_past_capacity() -> None:
    """put_nowait accepts exactly ``capacity`` items, then raises WouldBlock."""
    box = Mailbox(3)
    for n in range(3):
        box.put_nowait(n)
    with pytest.raises(WouldBlock):
        box.put_nowait(3)
    assert len(box) == 3


def test_items_come_out_in_fifo_order() -> None:
    """Items come out in the order they went in, and room frees up as they do."""
    box = Mailbox(2)
    out = []
    for n in range(6):
        box.put_nowait(n)
        if len(box) == 2:
            out.append(box.get_nowait())
    while len(box):
        out.append(box.get_nowait())
    assert out == [0, 1, 2, 3, 4, 5]


def test_get_nowait_on_empty_open_mailbox_would_block() -> None:
    """get_nowait on an empty, open mailbox raises WouldBlock (not EndOfStream)."""
    box = Mailbox(1)
    with pytest.raises(WouldBlock):
        box.get_nowait()
    assert not box.closed


def test_close_refuses_new_items_but_drains_queued_ones() -> None:
    """After close, puts raise ClosedResourceError; queued items still come out, then EOS."""
    box = Mailbox(4)
    box.put_nowait("a")
    box.put_nowait("b")
    box.close()
    box.close()  # idempotent
    assert box.closed
    with pytest.raises(ClosedResourceError):
        box.put_nowait("c")
    assert box.get_nowait() == "a"
    assert box.get_nowait() == "b"
    with pytest.raises(EndOfStream):
        box.get_nowait()


async def test_closed_put_raises_even_with_room() -> None:
    """The awaiting put raises ClosedResourceError on a closed mailbox instead of waiting."""
    box = Mailbox(4)
    box.close()
    with anyio.fail_after(1), pytest.raises(ClosedResourceError):
        await box.put("x")


async def test_get_waits_for_an_item() -> None:
    """A waiting get returns the item a later put_nowait delivers."""
    box = Mailbox(1)
    got: list[object] = []

    async def getter() -> None:
        got.append(await box.get())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(getter)
            await anyio.wait_all_tasks_blocked()
            assert got == []
            box.put_nowait("hello")
    assert got == ["hello"]


async def test_close_wakes_a_waiting_get_with_end_of_stream() -> None:
    """Closing an empty mailbox ends a waiting get with EndOfStream."""
    box = Mailbox(1)
    outcome: list[str] = []

    async def getter() -> None:
        try:
            await box.get()
        except EndOfStream:
            outcome.append("eos")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(getter)
            await anyio.wait_all_tasks_blocked()
            box.close()
    assert outcome == ["eos"]


async def test_put_waits_for_room_and_keeps_order() -> None:
    """A put on a full mailbox waits until a get makes room, then lands after the others."""
    box = Mailbox(2)
    box.put_nowait(1)
    box.put_nowait(2)
    done = anyio.Event()

    async def putter() -> None:
        await box.put(3)
        done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(putter)
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set()
            assert len(box) == 2
            assert box.get_nowait() == 1
            await done.wait()
    assert [box.get_nowait(), box.get_nowait()] == [2, 3]


async def test_close_wakes_a_waiting_put_with_closed_error() -> None:
    """Closing a full mailbox ends a waiting put with ClosedResourceError; nothing is added."""
    box = Mailbox(1)
    box.put_nowait("queued")
    outcome: list[str] = []

    async def putter() -> None:
        try:
            await box.put("late")
        except ClosedResourceError:
            outcome.append("closed")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(putter)
            await anyio.wait_all_tasks_blocked()
            box.close()
    assert outcome == ["closed"]
    assert box.get_nowait() == "queued"
    with pytest.raises(EndOfStream):
        box.get_nowait()


async def test_cancelled_get_leaves_the_mailbox_usable() -> None:
    """A cancelled waiting get takes nothing; later puts and gets work as usual."""
    box = Mailbox(2)
    with anyio.move_on_after(0.01) as scope:
        await box.get()
    assert scope.cancelled_caught
    box.put_nowait("a")
    assert len(box) == 1
    with anyio.fail_after(1):
        assert await box.get() == "a"

    got: list[object] = []

    async def getter() -> None:
        got.append(await box.get())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(getter)
            await anyio.wait_all_tasks_blocked()
            box.put_nowait("b")
    assert got == ["b"]


async def test_cancelled_put_adds_nothing_and_other_putters_still_wake() -> None:
    """A cancelled waiting put adds nothing, and another waiting put still gets the room."""
    box = Mailbox(1)
    box.put_nowait("first")
    done = anyio.Event()

    async def patient() -> None:
        await box.put("patient")
        done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            async with anyio.create_task_group() as impatient:
                impatient.start_soon(box.put, "impatient")
                await anyio.wait_all_tasks_blocked()
                impatient.cancel_scope.cancel()
            assert box.get_nowait() == "first"
            await done.wait()
    assert box.get_nowait() == "patient"
    with pytest.raises(WouldBlock):
        box.get_nowait()
