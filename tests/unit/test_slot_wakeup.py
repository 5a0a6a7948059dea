"""`SlotWakeup`: one waiting row woken per freed slot, oldest first; time-outs skipped."""

from __future__ import annotations

import asyncio

from flux2_pipeline.batch.wakeup import SlotWakeup


async def test_a_freed_slot_wakes_only_the_row_that_waited_longest() -> None:
    wakeup = SlotWakeup()
    first = asyncio.ensure_future(wakeup.wait(30))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(wakeup.wait(0.2))
    await asyncio.sleep(0)
    assert wakeup.waiting == 2

    wakeup.freed()

    assert await first is True
    assert await second is False
    assert wakeup.waiting == 0


async def test_a_slot_freed_while_nobody_waits_is_not_kept() -> None:
    wakeup = SlotWakeup()
    wakeup.freed()
    assert await wakeup.wait(0.05) is False


async def test_a_row_that_timed_out_is_skipped() -> None:
    wakeup = SlotWakeup()
    assert await wakeup.wait(0.01) is False
    later = asyncio.ensure_future(wakeup.wait(30))
    await asyncio.sleep(0)
    wakeup.freed()
    assert await later is True
