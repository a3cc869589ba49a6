#!/usr/bin/env bash
# The GPU checks in one run (about 5 minutes on a machine with CUDA and no network): the CUDA tests, then the
# figures BENCHMARKS.md records for a GPU, each as one JSON line. Writes them to ${OUT:-gpu_check}/ as well.
#
#   bash scripts/gpu_check.sh
set -uo pipefail
out="${OUT:-gpu_check}"
mkdir -p "$out"
python - <<'PY' | tee "$out/machine.txt"
import torch
from eva_rl.experiments.machine import describe_platform
print(describe_platform("cuda" if torch.cuda.is_available() else "cpu"))
PY
status=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, keep its output, note a failure and go on
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt" || status=1
}
step cuda-tests 120 python -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
step device-crossover 60 eva-rl bench --device-crossover --quick
step eva-vs-peft 60 eva-rl bench --peft-only --device cuda --quick
step bench-cuda 120 eva-rl bench --device cuda --quick --offpolicy-task ""
exit $status
