#!/bin/bash
# The LoRA-aggregation table of the README (Fine-tuning an LLM, "Measured"): the base exported by
# instruction_tuning.sh, fine-tuned on tinyshakespeare by speaker with every method, three seeds.
# Usage: bash benchmarks/quality/lora_methods.sh BASE_DIR OUT; then fedrun report OUT
set -e
BASE=${1:?exported base}; O=${2:?output folder}; F=.venv/bin/fedrun; DATA=${DATA:-../shared/data/tinyshakespeare.txt}
B="data=shakespeare data.path=$DATA model=hf model.name_or_path=$BASE model.from_config=null rounds=10 eval_every=5 eval.per_client=true device=cpu"
R="client.lora_ranks=[{rank:4,fraction:0.34},{rank:8,fraction:0.33},{rank:16,fraction:0.33}]"
for s in 0 1 2; do
  for a in avg ffa fedsa flora flexlora; do $F train $B model.lora.aggregation=$a seed=$s run_dir=$O/${a}_s$s; done
  $F train $B model.lora.aggregation=flexlora "$R" model.lora.r=16 seed=$s run_dir=$O/flexlora_mixed_s$s
  $F train $B model.lora.aggregation=hetlora "$R" model.lora.r=16 seed=$s run_dir=$O/hetlora_mixed_s$s
  $F train $B strategy=local seed=$s run_dir=$O/local_s$s
  $F train $B strategy=centralized seed=$s run_dir=$O/centralized_s$s
  $F train $B model.lora.enabled=false seed=$s run_dir=$O/full_s$s
done
