"""`python -m bench [--quick]`: run the suite, print the table, write JSON, table and PNG."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .procs import BenchError, missing_tools

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
EXIT_MISSING_TOOL = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, one run: a smoke test in seconds",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where the results go (default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, help="zotlb workers (default: one per core)"
    )
    parser.add_argument(
        "--runs", type=int, help="runs per figure (default: 3, quick: 1)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a target is missed"
    )
    args = parser.parse_args(argv)

    missing = missing_tools()
    if missing:
        print(
            "bench: missing tools; install them with\n"
            f"  apt-get install {' '.join(missing)}\n"
            "(or run scripts/setup.sh --test)",
            file=sys.stderr,
        )
        return EXIT_MISSING_TOOL

    from .suite import Suite, settings

    cfg = settings(args.quick, args.workers, args.runs)
    # A SIGTERM unwinds like Ctrl+C, so every started process is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    # The blobs and the backends' storage live in a temp dir, never in git.
    with tempfile.TemporaryDirectory(prefix="zotlb-bench-") as tmp:
        try:
            results = Suite(cfg, Path(tmp), log).run()
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    paths = results.write(args.out, f"bench-{cfg.mode}")
    print(results.table())
    print(f"results: {', '.join(str(p) for p in paths.values())}")
    missed = [t for t in results.targets if t.met is False]
    if missed:
        print(f"{len(missed)} target(s) missed: " + "; ".join(t.name for t in missed))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
