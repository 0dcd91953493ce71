"""``python -m bench [NAME ...]``: run every ``bench/bench_*.py``, print a table, and merge
the figures into ``.bench/results.json`` (a flat object of named numbers)."""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / ".bench" / "results.json"


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    failed = []
    for name in names:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            figures = importlib.import_module(f"bench.bench_{name}").run()
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        results.update({k: float(v) for k, v in figures.items()})
        for k, v in figures.items():
            print(f"   {k:<36} {v:>14.4g}")
        print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    print(
        f"\nwrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}"
    )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
