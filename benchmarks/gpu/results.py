"""Gathers what benchmarks/gpu/run.sh did into one JSON and one Markdown file.

    python benchmarks/gpu/results.py --work DIR --out DIR --mode gpu|dry-run

DIR (--work) holds, per step NAME in run order (steps.txt), NAME.log (its output),
NAME.rc and NAME.sec, and for some steps NAME.json (gpu_extract.py's rows, the
cluster check's verdict) or tests.xml (pytest's JUnit report). Writes
gpu-results.json and gpu-results.md into --out and prints the Markdown. Standard
library only: it must run even where an install failed.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TAIL = 3000  # characters of each step's log kept in the JSON


def read_steps(work: Path) -> list[dict[str, Any]]:
    steps = []
    for name in (work / "steps.txt").read_text().split():
        log = work / f"{name}.log"
        rc = work / f"{name}.rc"
        sec = work / f"{name}.sec"
        data = work / f"{name}.json"
        text = log.read_text(errors="replace") if log.is_file() else ""
        steps.append(
            dict(
                name=name,
                rc=int(rc.read_text()) if rc.is_file() else None,
                seconds=int(sec.read_text()) if sec.is_file() else None,
                log_tail=text[-TAIL:],
                data=json.loads(data.read_text()) if data.is_file() else None,
            )
        )
    return steps


def junit(path: Path) -> dict[str, Any] | None:
    """pytest's counts and each test's outcome from its JUnit XML."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {(node.get('message') or '')[:200]}"
        cases.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome))
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return dict(counts, cases=cases)


def markdown(res: dict[str, Any]) -> str:
    out = [f"# GPU check ({res['mode']}), {res['date']}", ""]
    out += [f"Machine: {res['machine']}", ""]
    out += ["| step | exit | seconds |", "|---|---|---|"]
    out += [f"| {s['name']} | {s['rc']} | {s['seconds']} |" for s in res["steps"]]
    tests = res.get("tests")
    if tests:
        out += ["", f"## gpu-marked tests: {tests['tests']} run, {tests['failures']} failed, "
                f"{tests['errors']} errors, {tests['skipped']} skipped", ""]  # fmt: skip
        out += [f"- `{c['test']}`: {c['outcome']}" for c in tests["cases"]]
    rows = (step_data(res, "bench") or {}).get("rows", [])
    if rows:
        out += ["", "## gpu_extract.py (steady-state rates; whole = the whole extract call)", ""]
        out += [
            "| model | px | prep | n | bare img/s | pipeline img/s | ratio | whole s | GPU GB "
            "| MB/s | CPU main / pin / loader / writers / other (cores) "
            "| shipped MB/batch (in flight) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        out += [bench_row(r) for r in rows]
    cluster = step_data(res, "cluster")
    if cluster:
        out += ["", "## 2-worker --cluster vs one process", "", "```", json.dumps(cluster), "```"]
    for s in res["steps"]:
        if s["name"] in ("env", "preflight"):
            out += ["", f"## {s['name']}", "", "```", s["log_tail"].strip(), "```"]
    return "\n".join(out) + "\n"


def step_data(res: dict[str, Any], name: str) -> Any:
    return next((s["data"] for s in res["steps"] if s["name"] == name), None)


def bench_row(r: dict[str, Any]) -> str:
    c = r.get("cpu_cores", {})
    gb = "-" if r.get("gpu_peak_gb") is None else f"{r['gpu_peak_gb']:.1f}"
    cpu = (
        f"{c.get('main', 0):.2f} / {c.get('pin', 0):.2f} / {c.get('loader', 0):.1f} of "
        f"{r['workers']} / {c.get('writers', 0):.1f} of {r['writers']} / {c.get('other', 0):.2f}"
    )
    ship = f"{r['ship_mb_per_batch']:.1f} ({r['shm_in_flight_mb']})"
    return (
        f"| {r['model']} | {r['size']} | {r['placement']} | {r['n']} | {r['bare_img_s']:.0f} "
        f"| {r['pipe_img_s']:.0f} | {r['ratio']:.3f} | {r['whole_s']:.1f} | {gb} "
        f"| {r['mb_s']:.0f} | {cpu} | {ship} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    args = ap.parse_args()
    info = json.loads((args.work / "info.json").read_text())
    res = dict(mode=args.mode, **info, steps=read_steps(args.work))
    res["tests"] = junit(args.work / "tests.xml")
    res["ok"] = all(s["rc"] == 0 for s in res["steps"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-results.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (args.out / "gpu-results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
