#!/bin/bash
# GPU session driver for the kernel work (run by the remote `run` tool from the repo root).
# usage: bash benchmarks/results/kernels.gpu.sh test|bench   (bench = tune on 8192², then benchmark)
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
case "$1" in
test)
  T=tests/kernels
  (python -m pytest -q -p no:cacheprovider $T/test_wna16.py -k dtype0 > /tmp/t1.log 2>&1; echo "wna16 fp16 rc=$?" >> /tmp/t1.log) &
  (python -m pytest -q -p no:cacheprovider $T/test_wna16.py -k "not dtype0" > /tmp/t2.log 2>&1; echo "wna16 rest rc=$?" >> /tmp/t2.log) &
  (python -m pytest -q -p no:cacheprovider $T/test_w4a4.py > /tmp/t3.log 2>&1; echo "w4a4 rc=$?" >> /tmp/t3.log) &
  (python -m pytest -q -p no:cacheprovider $T/test_hadamard.py $T/test_dispatch.py > /tmp/t4.log 2>&1; echo "had+dispatch rc=$?" >> /tmp/t4.log) &
  wait
  for f in /tmp/t1.log /tmp/t2.log /tmp/t3.log /tmp/t4.log; do grep -E "passed|failed|rc=|^E  |FAILED|Error" $f | cut -c1-150 | sort | uniq -c | sort -rn | head -8; done
  ;;
bench)
  python -m benchmarks.kernels --device cuda --tune --out "$OUT"
  ;;
esac
