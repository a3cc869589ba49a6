"""Check that the README's main-job table and sentence match what the main job prints today.

python scripts/check_readme.py                      # a fresh run, in a temporary folder (a few minutes)
python scripts/check_readme.py --log-dir runs       # reuse the completed runs of an earlier main job
"""

import argparse
import sys
import tempfile
from pathlib import Path

from eva_rl.experiments.reproduce import RETURN_TOLERANCE, check_readme
from eva_rl.experiments.tasks import ROOT

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", type=Path, help="where the main job runs (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        problems, drift, output = check_readme(ROOT / "README.md", args.log_dir or Path(scratch))
    print(output)
    for line in drift:
        print(f"drift: {line}")
    for problem in problems:
        print(f"differs: {problem}")
    if problems:
        print(f"{len(problems)} difference(s)")
    elif drift:
        print(f"README matches today's main job within {RETURN_TOLERANCE} (returns drift with the platform)")
    else:
        print("README matches today's main job")
    sys.exit(1 if problems else 0)
