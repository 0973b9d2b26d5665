#!/usr/bin/env bash
# The GPU checks, sized for a lent machine (PyTorch there, no network, ~10 minutes):
#   1. every distiller's losses on CUDA against the CPU values (bench/gpu_losses.py:
#      torch and torchvision only);
#   2. the distillation-step benchmark on CUDA (bench/det_distill_step.py: needs mmdet,
#      mmengine and an mmcv with CUDA ops);
#   3. one demo trial per task with amp (needs the whole stack: ray, mmdet, mmseg and
#      mmcv's CUDA ops, built here when nvcc is present and time allows).
# Each step that cannot run says why, and the others still run. Prints the machine first.
#   bench/gpu_check.sh [PYTHON]         (from the repository root; default: .venv's python,
#                                        else python3: an existing environment is used as is)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
[[ -z "$PY" ]] && { [[ -x .venv/bin/python ]] && PY=.venv/bin/python || PY=python3; }
status=0
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
"$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices', torch.cuda.device_count())"
echo "== 1. distillers' losses, CUDA against CPU"
"$PY" bench/gpu_losses.py || status=1
echo "== 2. distillation step on CUDA"
if "$PY" -c "import mmdet, mmengine, mmcv.ops; from mmcv.ops import get_compiling_cuda_version as v; assert v() != 'not available', 'mmcv has no CUDA ops'" 2>/tmp/gpu_check_why; then
    "$PY" bench/det_distill_step.py --device cuda --reps 5 || status=1
else
    echo "not run: $(tail -1 /tmp/gpu_check_why) (install mmdet and an mmcv with CUDA ops: scripts/setup_env.sh builds one where nvcc is)"
fi
echo "== 3. one demo trial per task with amp"
if "$PY" -c "import ray, mmdet, mmseg, mmcv.ops; from mmcv.ops import get_compiling_cuda_version as v; assert v() != 'not available', 'mmcv has no CUDA ops'" 2>/tmp/gpu_check_why; then
    out=$(mktemp -d "$PWD/results/gpu-check-XXXX")
    "$PY" - "$out" <<'PYEOF' || status=1
import sys, time, yaml
from pathlib import Path
out = Path(sys.argv[1])
doc = yaml.safe_load(open("suites/demo.yaml"))
doc.update(output=str(out / "demo"), seeds=[0], resources={"cpu": 4, "gpu": 1})
doc["schedule"].update(amp=True, amp_dtype="bfloat16", num_workers=2, pin_memory=True)
for side in ("teachers", "students"):
    for m in doc[side].values():
        m.setdefault("schedule", {}).update(amp=True, amp_dtype="bfloat16")
path = out / "demo.yaml"
path.write_text(yaml.safe_dump(doc, sort_keys=False))
from harness.cli import main
started = time.perf_counter()
code = main(["run", str(path), "--output-root", str(out)])
print(f"demo with amp: exit {code}, {time.perf_counter() - started:.0f} s")
from harness.store import results
df = results.read_results(out / "demo")
df = df[df["primary"]]
print(df[["trial_name", "status", "value", "device", "train_images_per_s", "peak_memory_mb", "wall_time_s"]].to_string(index=False))
sys.exit(code)
PYEOF
else
    echo "not run: $(tail -1 /tmp/gpu_check_why) (the demo needs ray, mmdet, mmseg and mmcv's CUDA ops)"
fi
exit $status
