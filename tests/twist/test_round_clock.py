"""RoundClock: when a host loop's iterations close and open rounds (twist/rounds.py).

The clock is shared by TwistRoundHook and ZeroRoundHook; the bit-for-bit results of both are
tested end to end (tests/integrations/); here its rule alone, with a boundary that records calls.
"""

from types import SimpleNamespace

import pytest

from megatron_twist.twist.rounds import RoundClock


class Boundary:
    """Opens and closes like the hooks do (close advances the central step); fixed byte counts."""

    def __init__(self, central, open_bytes=3, close_bytes=100):
        self.central, self.open_bytes, self.close_bytes = central, open_bytes, close_bytes
        self.events = []
        self.refuse = False

    def open_round(self):
        if self.refuse:
            raise RuntimeError("refused")
        self.events.append(("open", self.central.step))
        return self.open_bytes

    def close_round(self, steps_taken):
        self.events.append(("close", steps_taken))
        self.central.step += steps_taken
        self.central.round += 1
        return self.close_bytes


def make(step=0, local_steps=4):
    central = SimpleNamespace(step=step, round=0)
    boundary = Boundary(central)
    return central, boundary, RoundClock(central, local_steps, boundary)


def test_rounds_close_every_local_steps_and_a_partial_last_round_at_finish():
    central, boundary, clock = make()
    moved = [clock.on_iteration_start(it) for it in range(10)]
    assert clock.finish(10) == 100
    assert boundary.events == [("open", 0), ("close", 4), ("open", 4), ("close", 4), ("open", 8), ("close", 2)]
    # a close reports its bytes plus the next open's; an iteration that only opens reports None
    assert moved == [None, None, None, None, 103, None, None, None, 103, None]
    assert (central.step, central.round, clock.is_open) == (10, 3, False)


def test_finish_on_a_boundary_closes_nothing_twice():
    central, boundary, clock = make()
    for it in range(8):
        clock.on_iteration_start(it)
    assert clock.finish(8) == 100
    assert clock.finish(8) is None  # nothing open any more
    assert boundary.events[-1] == ("close", 4) and central.step == 8


def test_finish_then_start_at_a_boundary_opens_once():
    """The DeepSpeed loop closes a round with finish(it) (to save in between), then starts it."""
    central, boundary, clock = make()
    for it in range(4):
        clock.on_iteration_start(it)
    assert clock.finish(4) == 100
    assert clock.on_iteration_start(4) is None  # opened, nothing closed here
    assert boundary.events == [("open", 0), ("close", 4), ("open", 4)]


def test_a_resumed_loop_opens_without_closing():
    central, boundary, clock = make(step=8)
    assert clock.on_iteration_start(8) is None
    assert clock.finish(8) is None  # no step taken since the resume: nothing to aggregate
    assert boundary.events == [("open", 8)]


def test_a_refused_open_leaves_no_round_open():
    central, boundary, clock = make()
    boundary.refuse = True
    with pytest.raises(RuntimeError):
        clock.on_iteration_start(0)
    assert not clock.is_open and clock.finish(3) is None and boundary.events == []
