"""The standing drill suite: every case is a bad input tried, a fault injected or a security hole probed.

Each case runs inside ``with drill.input(name):`` / ``drill.fault(name)`` / ``drill.hole(name)``: the
block holds the case and its exact assertions. The record says whether the block passed (the input was
handled: a counted skip or the exact clear error; the fault was survived; the hole is closed). Records go
to the JSON-lines file ``$MEDVLM_DRILL_LOG`` when set, which ``python -m tests.reliability.report``
totals; a failing block also fails its test, so CI sees every regression.
"""
from __future__ import annotations

import contextlib
import json
import os

import pytest


class Drill:
    def __init__(self, test: str):
        self.test = test

    def _record(self, kind: str, case: str, ok: bool, **extra) -> None:
        path = os.environ.get("MEDVLM_DRILL_LOG")
        if not path:
            return
        line = json.dumps({"kind": kind, "test": self.test, "case": case, "ok": ok, **extra}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write per line in O_APPEND: lines of parallel workers never mix
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _case(self, kind: str, case: str):
        info: dict = {}
        try:
            yield info  # the block may set info["bytes_lost"] (faults) for the report
        except BaseException:
            self._record(kind, case, False, **info)
            raise
        self._record(kind, case, True, **info)

    def input(self, case: str):
        """A bad input: handled when the block passes (counted skip or the exact clear error)."""
        return self._case("input", case)

    def fault(self, case: str):
        """An injected fault (kill, corruption): survived when the block passes; set info['bytes_lost']."""
        return self._case("fault", case)

    def hole(self, case: str):
        """A security probe (remote code, path escape, pickle, PHI): closed when the block passes."""
        return self._case("security", case)


@pytest.fixture
def drill(request) -> Drill:
    return Drill(request.node.nodeid)
