"""Compare two junit XML reports (stock, swapped); write a markdown report; exit 1 if a stock pass fails swapped."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """Test id -> (outcome, first line of the failure message) from a pytest junit XML file."""
    results = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
                break
        results[test_id] = (outcome, message)
    return results


def main(stock_xml: str, swapped_xml: str, out_md: str) -> int:
    stock, swapped = outcomes(Path(stock_xml)), outcomes(Path(swapped_xml))
    regressions = sorted(t for t, (o, _) in stock.items() if o == "passed" and swapped.get(t, ("missing",))[0] != "passed")
    lines = [
        "| run | " + " | ".join(("passed", "failed", "error", "skipped")) + " |",
        "|---|---|---|---|---|",
    ]
    for label, results in (("stock", stock), ("swapped", swapped)):
        counts = Counter(o for o, _ in results.values())
        lines.append(f"| {label} | " + " | ".join(str(counts[k]) for k in ("passed", "failed", "error", "skipped")) + " |")
    lines += ["", f"Pass stock, fail swapped: {len(regressions)}", ""]
    lines += [f"- `{t}`: {swapped.get(t, ('missing', ''))[1]}" for t in regressions]
    stock_failures = Counter(m for o, m in stock.values() if o in ("failed", "error"))
    lines += ["", "Stock failures by message (count):", ""]
    lines += [f"- {n} x {m}" for m, n in stock_failures.most_common()]
    Path(out_md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 6 + len(regressions)]))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
