"""Render the per-family table from one or more --conformance-log files: python -m conformance.table LOG..."""

from __future__ import annotations

import json
import sys
from collections import Counter

from conformance.plugin import Outcome, render_table


def main(paths: list[str]) -> None:
    outcomes: dict[str, tuple[str, Outcome]] = {}
    details: Counter = Counter()
    for path in paths:
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                outcomes[entry["nodeid"]] = (entry["status"], Outcome())
                if entry["detail"]:
                    details[f"{entry['status']}: {entry['detail']}"] += 1
    print(render_table(outcomes))
    for detail, count in details.most_common():
        print(f"- {count} x {detail}")


if __name__ == "__main__":
    main(sys.argv[1:])
