#!/bin/bash
# The threads measurements of issue #21 (README "Sweeps"): wall time of
#  (a) one default run alone, then two started together (threads=auto: each all cores; and threads=1 each);
#  (b) a 4-job sweep run sequentially, then with hydra/launcher=joblib n_jobs=2 (threads=auto gives each
#      job cores/2; threads=2 is what every job took before the threads key).
# Each figure with the 1-minute load average when it ended. Usage: bash benchmarks/threads.sh OUT
set -e
O=${1:?output folder}; F=$PWD/.venv/bin/fedrun; mkdir -p "$O"; cd "$O"
R="rounds=10 eval_every=10 device=cpu"
t() { local s=$(date +%s.%N); "$@" > /dev/null 2>&1; echo "$(echo "$(date +%s.%N) - $s" | bc)"; }
load() { cut -d' ' -f1 /proc/loadavg; }
echo "alone: $(t $F train $R run_dir=alone) s (load $(load))"
for th in auto 1; do
  s=$(date +%s.%N)
  $F train $R threads=$th run_dir=two_${th}_a > /dev/null 2>&1 & a=$!
  $F train $R threads=$th run_dir=two_${th}_b > /dev/null 2>&1 & b=$!
  wait $a; ta=$(echo "$(date +%s.%N) - $s" | bc); wait $b; tb=$(echo "$(date +%s.%N) - $s" | bc)
  echo "two together, threads=$th: $ta s and $tb s (load $(load))"
done
S="seed=0,1,2,3 rounds=5 eval_every=5 device=cpu"
echo "sweep of 4, sequential: $(t $F sweep $S) s (load $(load))"
for th in auto 2; do
  echo "sweep of 4, joblib n_jobs=2, threads=$th: $(t $F sweep $S hydra/launcher=joblib hydra.launcher.n_jobs=2 threads=$th) s (load $(load))"
done
