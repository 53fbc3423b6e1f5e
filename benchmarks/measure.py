"""Wall time and peak resident memory of one command, run as a child process.

    python benchmarks/measure.py -- allocate ../shared/models/llama-dense-16m --budget 2.5 ...

Prints one JSON line: the command, exit code, wall seconds and the child's peak RSS in MiB
(getrusage RUSAGE_CHILDREN, i.e. the largest resident set the command reached).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit(__doc__)
    t0 = time.perf_counter()
    rc = subprocess.call(argv)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"command": " ".join(argv), "exit_code": rc, "wall_s": round(wall, 2), "peak_rss_mib": round(peak, 1)}))
    sys.exit(rc)


if __name__ == "__main__":
    main()
