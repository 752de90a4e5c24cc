"""Stopping cleanly: SIGINT/SIGTERM set a flag that the loop reads at safe points (between
warm-up steps, evaluation batches, rollouts), so a run ends with its last consistent state
saved and the shell's exit code for the signal (130, 143). Also the test-only fault points."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A stop signal arrived; `where` says what the run was doing."""

    def __init__(self, signum: int, where: str):
        self.signum, self.where = signum, where
        super().__init__(f"{signal.Signals(signum).name} during {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TrainingFailed(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the CLI exits 1."""


class StopRequest:
    """The flag the signal handlers set; `check(where)` raises Interrupted once it is set."""

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, where: str) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum, where)

    def check_local(self, where: str) -> None:
        """check(), at a point that ranks of a distributed run reach unequal numbers of times."""
        self.check(where)

    def generation_criteria(self):
        """For generate(): end it at once when a stop signal has arrived (its outputs are dropped
        at the next check), so a stop does not wait for a long sampling to finish."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = self

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.requested, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([Stopped()])

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def catching(self):
        """SIGINT/SIGTERM set the flag instead of killing the process, inside the block.
        Signal handlers can only be installed from the main thread; elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# ---- test-only fault injection ----------------------------------------------------------
# PMI_TRAIN_FAULT="<point>@<n>=<SIGNAL>" makes this process send itself SIGNAL (SIGKILL, SIGTERM,
# SIGINT) the n-th time it reaches fault_point("<point>"); tests/test_train_faults.py and
# tests/test_train_signals.py use it to kill or interrupt a run at an exact moment. Unset (always,
# outside those tests), fault_point returns at once.
FAULT_ENV = "PMI_TRAIN_FAULT"
FAULT_SPEC = re.compile(r"(?P<point>[a-z-]+)@(?P<count>\d+)=(?P<signal>SIG[A-Z]+)")
FAULT_ARRIVALS: collections.Counter = collections.Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    match = FAULT_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <point>@<n>=<SIGNAL>, e.g. save-renamed@1=SIGKILL")
    FAULT_ARRIVALS[name] += 1
    if match["point"] == name and FAULT_ARRIVALS[name] == int(match["count"]):
        os.kill(os.getpid(), getattr(signal, match["signal"]))
