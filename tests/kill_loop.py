"""The 50-kill resume loop: ``python3 tests/kill_loop.py [--kills 50] [--seed 0]`` from the repo root.

Each round kills ``qadapter train`` at a random point, drawn half from the fault points of an
uninterrupted run (inside saves included; fault_runner.py) with a random signal, half at a random
wall-clock time with a random signal, then resumes it and checks the invariants of kill_suite.py.
Prints one line per round and a summary; exits 1 if any round failed.
"""
import argparse
import random
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kill_suite import kill_and_resume, make_setup  # noqa: E402

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    outcomes, failures = Counter(), []
    with tempfile.TemporaryDirectory(prefix="qadapter-kill-loop-") as tmp:
        setup = make_setup(Path(tmp))
        print(f"uninterrupted run: {setup.seconds:.1f} s, fault points reached: {setup.reached}", flush=True)
        for round_ in range(args.kills):
            name = rng.choice(sorted(SIGNALS))
            workdir = Path(tmp) / f"round{round_}"
            workdir.mkdir()
            if round_ % 2 == 0:
                point = rng.choice(sorted(setup.reached))
                spec, kwargs = f"{name}@{point}:{rng.randint(1, setup.reached[point])}", {}
            else:
                spec, kwargs = None, {"after_seconds": rng.uniform(0.5, setup.seconds), "sig": SIGNALS[name]}
            try:
                line = kill_and_resume(setup, workdir, spec, **kwargs)
                outcomes["ok"] += 1
            except Exception:  # noqa: BLE001 - a failed round is reported, the loop goes on
                line = f"FAILED {spec or kwargs}: " + traceback.format_exc().strip().splitlines()[-1]
                failures.append(line)
            print(f"[{round_ + 1}/{args.kills}] {line}", flush=True)
    print(f"\n{outcomes['ok']} of {args.kills} kills resumed to the uninterrupted run's adapter bit for bit; "
          f"{len(failures)} failed")
    for line in failures:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
