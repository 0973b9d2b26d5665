#!/usr/bin/env bash
# On a machine with a GPU: the demo suite on the GPU (amp on, pinned memory, two loader
# workers), then the distillation-step benchmark on CUDA. Prints the machine, each
# trial's images/s and peak memory from the rows, and the step times per method.
#   bench/gpu_check.sh            (from the repository root; sets up .venv on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh >/dev/null
PY=.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name())"
out=$(mktemp -d "$PWD/results/gpu-check-XXXX")
sed -e "s#^output:.*#output: $out/demo#" \
    -e "s#^resources:.*#resources: {cpu: 2, gpu: 1}#" suites/demo.yaml > "$out/demo.yaml"
$PY - "$out/demo.yaml" <<'PYEOF'
import sys, yaml
path = sys.argv[1]
doc = yaml.safe_load(open(path))
doc.setdefault("schedule", {}).update(amp=True, num_workers=2, pin_memory=True)
doc["resources"] = {"cpu": 2, "gpu": 1}
yaml.safe_dump(doc, open(path, "w"), sort_keys=False)
PYEOF
time bin/harness run "$out/demo.yaml" --output-root "$out"
$PY - "$out/demo" <<'PYEOF'
import sys
from harness.store import results
df = results.read_results(sys.argv[1])
df = df[df["primary"] & (df["status"] == "ok")]
print(df[["trial_name", "device", "train_images_per_s", "peak_memory_mb", "wall_time_s"]].to_string(index=False))
PYEOF
$PY bench/det_distill_step.py --device cuda --reps 5
