"""The gather-thread tuner of the threaded loader."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["GatherTuner"]

log = logging.getLogger(__name__)


class GatherTuner:
    """Chooses, window by window, between gathering ahead on threads and in the loop
    (NOTE [gathering in the loop]). One per loader, kept across its epochs.

    The way chosen is used for windows in a row; now and then one window tries the other way
    (a probe), and the window after it is the chosen way again. The probe wins only if it beat
    the mean of the chosen way's windows on either side of it by ``margin``: the comparison is
    between neighbouring windows, so a loop that speeds up or slows down for reasons of its
    own (other load on the machine) does not decide it.

    Args:
        window_batches: batches a window has at least.
        window_seconds: seconds a window lasts at least.
        probe_every: windows of the chosen way before the next probe, at most (counted from
            the window after the last probe, which is the chosen way too): the count starts at
            one window and grows ``growth`` times with every probe, so early windows (cold
            caches, first page faults of a fresh store) are soon measured again.
        margin: how much faster (a fraction) a probe must have been to change the way chosen.
        growth: how much longer each interval between probes is than the one before.
        clock: the time source (tests pass their own).
    """

    def __init__(
        self,
        window_batches: int = 32,
        window_seconds: float = 0.25,
        probe_every: int = 64,
        margin: float = 0.03,
        growth: int = 4,
        clock: Any = time.perf_counter,
    ) -> None:
        self.window_batches, self.window_seconds = window_batches, window_seconds
        self.probe_every, self.margin, self.growth = probe_every, margin, growth
        self.clock = clock
        self.inline = False  # the way used now; starts ahead: threads win where CPU is idle
        self.chosen_inline = False  # the way chosen (used outside probes)
        self.rates: dict[bool, float | None] = {False: None, True: None}  # batches/s, last window
        self.switches = 0  # changes of the way used (a probe and its return are two)
        self.probes = 0  # windows that tried the way not chosen
        self.changes = 0  # probes that won: the way chosen changed
        self._phase = "chosen"  # "chosen", "probe" (the other way), "after" (chosen again)
        self._before = 0.0  # rate of the chosen way's window before the probe
        self._probe = 0.0  # rate of the probe's window
        self._windows = 0  # windows of the chosen way since the last probe
        self._interval = 1  # windows of the chosen way before a probe; grows to probe_every
        self._skip = 0
        self._t0: float | None = None
        self._n = 0

    @property
    def mode(self) -> str:
        """``"inline"`` (gather in the loop) or ``"ahead"`` (gather threads), used now."""
        return "inline" if self.inline else "ahead"

    @property
    def choice(self) -> str:
        """The way chosen: what :attr:`mode` is outside a probe."""
        return "inline" if self.chosen_inline else "ahead"

    def restart(self, skip: int) -> None:
        """A new window after ``skip`` batches (a switch's drain or fill)."""
        self._skip, self._t0, self._n = skip, None, 0

    def start_epoch(self) -> None:
        """A new epoch's iterator: its first batch pays the start-up, so it is not timed, and
        a probe still open is dropped undecided (the chosen way again), so that a probe is
        never judged against a window of another epoch (between them the loop may have
        evaluated, saved a checkpoint, or changed its step)."""
        if self._phase != "chosen":
            self._phase, self._windows = "chosen", 0
            if self.inline != self.chosen_inline:
                self.inline = self.chosen_inline
                self.switches += 1
        self.restart(1)

    def handed_out(self, depth: int) -> bool:
        """Count one batch handed out; True when the way used should change (then it has)."""
        if self._skip:
            self._skip -= 1
            return False
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
            return False
        self._n += 1
        if self._n < self.window_batches or now - self._t0 < self.window_seconds:
            return False
        rate = self.rates[self.inline] = self._n / (now - self._t0)
        use = self.inline
        if self._phase == "chosen":
            self._windows += 1
            if self._windows >= self._interval:  # time to try the other way for a window
                self._phase, self._before, use = "probe", rate, not self.chosen_inline
                self.probes += 1
        elif self._phase == "probe":  # back to the chosen way for the window after
            self._phase, self._probe, use = "after", rate, self.chosen_inline
        else:  # "after": the probe against the chosen way's windows on either side
            probed = "ahead" if self.chosen_inline else "inline"
            if self._probe > (self._before + rate) / 2 * (1 + self.margin):
                self.chosen_inline = not self.chosen_inline
                self.changes += 1
            self._phase, self._windows, use = "chosen", 0, self.chosen_inline
            self._interval = min(self.growth * self._interval, self.probe_every)
            log.debug(
                "%s probed at %.1f batches/s, the other way %.1f before and %.1f after: "
                "gathering %s",
                probed,
                self._probe,
                self._before,
                rate,
                self.choice,
            )
        self.restart(depth)
        if use == self.inline:
            return False
        self.inline = use
        self.switches += 1
        return True
