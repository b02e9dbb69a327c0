#!/usr/bin/env bash
# The one GPU run of benchmarks/gpu_benchmark.py (see benchmarks/README_GPU.md), from the repository root, on the
# device machine: installs the carried wheels (.whl/) into /tmp/site, runs the benchmark under a wall-clock limit and
# prints its summary, also when the limit stopped it. Results: $OUT/RESULTS_GPU.md, $OUT/RESULTS_GPU.json and the log.
#
#     bash benchmarks/gpu_run.sh                    # budget 300 s for the benchmark, killed at 330 s
#     BUDGET=240 LIMIT=270 bash benchmarks/gpu_run.sh --skip-phi
set -u -o pipefail

OUT="${OUT:-${PWD}/gpu_results}"
BUDGET="${BUDGET:-300}"
LIMIT="${LIMIT:-$((BUDGET + 30))}"
mkdir -p "$OUT"
log="$OUT/gpu_benchmark.log"
start=$(date +%s)

ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/ (carry it: see benchmarks/README_GPU.md)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee "$log" || exit 3
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "wheels installed in $(( $(date +%s) - start )) s" | tee -a "$log"

python3 - <<'EOF' 2>&1 | tee -a "$log"
import importlib.metadata as metadata, sys
names = ["torch", "triton", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "huggingface-hub",
         "tokenizers", "safetensors", "pyarrow", "fsspec", "dill", "multiprocess", "regex", "tqdm", "numpy", "pandas"]
versions = {}
for name in names:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
print("python", sys.version.split()[0], versions)
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv 2>&1 | tee -a "$log"

timeout --signal=TERM --kill-after=10 "$LIMIT" python3 benchmarks/gpu_benchmark.py --output-dir "$OUT" \
    --budget-seconds "$BUDGET" "$@" 2>&1 | tee -a "$log"
status=$?
if [ "$status" -ne 0 ]; then
    echo "gpu_benchmark.py exited with $status (124: stopped at the ${LIMIT} s limit); what it measured is kept:" \
        | tee -a "$log"
    [ -f "$OUT/RESULTS_GPU.json" ] && python3 benchmarks/gpu_benchmark.py --summary "$OUT/RESULTS_GPU.json" | tee -a "$log"
fi
echo "gpu_run.sh: $(( $(date +%s) - start )) s in all" | tee -a "$log"
exit "$status"
