# CUDA checks for a lent GPU machine (its image has torch, not fedrun's other requirements).
# Prepare here, once, from the repository root:
#   printf '/.whl/\n/.devdata/\n' >> .git/info/exclude; mkdir -p .devdata .whl
#   cp ../shared/data/tinyshakespeare.txt .devdata/
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   .venv/bin/pip download $P hydra-core==1.3.8 omegaconf==2.3.1 opacus==1.6.0 cryptography==50.0.2 cffi \
#      pycparser typer==0.29.2 rich==15.0.0 hydra-joblib-launcher==1.2.0
#   .venv/bin/pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl
# then run `bash benchmarks/device/run.sh` there, carrying .whl and .devdata. Everything it
# reports is also written, as it goes, under $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m fedrun.cli "$@"\n' > /tmp/bin/fedrun && chmod +x /tmp/bin/fedrun
export PATH=/tmp/bin:$PATH OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. one round's client updates, vectorized against sequential, on CUDA
timeout 90 python3 benchmarks/device/cuda_vcheck.py cuda 2>&1 | grep -v Warn | tee "$OUT/vcheck.log"
# 2. the default suite with device=auto (CUDA): failures with short tracebacks, logged as they come
timeout 300 python3 -m pytest -p no:cacheprovider -p no:benchmark -n 14 tests --timeout=80 -rfE --tb=short \
  -o addopts="-m 'not slow'" > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -80
# 3. seconds per round of sequential and vectorized on CUDA (W1, W2)
timeout 200 python3 benchmarks/device/cuda_bench.py 2>&1 | grep -v Warn | tee "$OUT/bench.log" | tail -20
