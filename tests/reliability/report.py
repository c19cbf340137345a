"""Run the drill suite and print its totals (the figures in the README's reliability section).

    python -m tests.reliability.report            # runs pytest on tests/reliability, then totals
    python -m tests.reliability.report --log FILE # totals of an existing drill log only
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def totals(records: list[dict]) -> dict:
    by = collections.defaultdict(lambda: [0, 0])
    lost = 0
    for r in records:
        by[r["kind"]][0] += 1
        by[r["kind"]][1] += bool(r["ok"])
        lost += int(r.get("bytes_lost", 0) or 0)
    inputs, faults, holes = by["input"], by["fault"], by["security"]
    return {"inputs_tried": inputs[0], "inputs_handled": inputs[1], "faults_tried": faults[0],
            "faults_survived": faults[1], "bytes_lost": lost, "security_probes": holes[0],
            "security_holes": holes[0] - holes[1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.reliability.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", help="total this drill log instead of running the suite")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -n 2)")
    args = ap.parse_args(argv)
    rc = 0
    if args.log:
        log = Path(args.log)
    else:
        log = Path(tempfile.mkdtemp(prefix="drill-")) / "drill.jsonl"
        env = dict(os.environ, MEDVLM_DRILL_LOG=str(log))
        rc = subprocess.call([sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
                              *args.pytest_args], env=env)
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    t = totals(records)
    print(f"inputs tried / handled:   {t['inputs_tried']} / {t['inputs_handled']}")
    print(f"faults tried / survived:  {t['faults_tried']} / {t['faults_survived']}")
    print(f"bytes lost:               {t['bytes_lost']}")
    print(f"security probes / holes:  {t['security_probes']} / {t['security_holes']}")
    for r in records:
        if not r["ok"]:
            print(f"  FAILED {r['kind']}: {r['case']} ({r['test']})")
    return rc or int(t["inputs_tried"] != t["inputs_handled"] or t["faults_tried"] != t["faults_survived"]
                     or t["security_holes"] > 0)


if __name__ == "__main__":
    sys.exit(main())
