"""The in-flight limit: never more holders than places, resizable, cancellation-safe."""

from __future__ import annotations

import anyio

from batchrun.flow.limits import InFlight


def test_never_more_holders_than_places_while_the_limit_moves() -> None:
    async def main() -> tuple[int, int]:
        places = InFlight(4)
        holding = peak = 0
        over = 0

        async def hold(i: int) -> None:
            nonlocal holding, peak, over
            async with places:
                holding += 1
                peak = max(peak, holding)
                over += holding > places.total
                await anyio.sleep(0.001 * (i % 3))
                holding -= 1

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(hold, i)
                if i == 50:
                    places.total = 2  # push-back
                if i == 120:
                    places.total = 6  # recovery hands places to waiters at once
        assert places.used == 0
        return peak, over

    peak, over = anyio.run(main)
    assert over == 0 and peak <= 6


def test_a_cancelled_waiter_leaves_no_place_taken() -> None:
    async def main() -> int:
        places = InFlight(1)
        async with places:
            with anyio.move_on_after(0.01):
                await places.__aenter__()  # waits: the only place is held
        async with places:  # the place came back
            pass
        return places.used

    assert anyio.run(main) == 0
