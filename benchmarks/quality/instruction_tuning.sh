#!/bin/bash
# The instruction-tuning measurements of the README (Instruction tuning, "Measured"): tiny_gpt from
# scratch, and a model=hf GPT-2 pretrained federatedly on pystdlib, exported, then fully fine-tuned
# and LoRA-tuned on both built-in instruction sets. Usage: bash benchmarks/quality/instruction_tuning.sh OUT
set -e
O=${1:?output folder}; F=.venv/bin/fedrun; DATA=${DATA:-../shared/data/tinyshakespeare.txt}
.venv/bin/python -m benchmarks.quality.held_out_choices "$DATA" "$O"
D="data=shakespeare_dialogue data.path=$O/train90.txt eval.choices=$O/mc.jsonl"
P="data=pystdlib_functions"
C="rounds=40 eval_every=5 eval.samples=3 device=cpu"
$F train $D model=tiny_gpt $C run_dir=$O/tiny_dialogue
$F train $P model=tiny_gpt $C run_dir=$O/tiny_functions
$F train model=hf model.lora.enabled=false rounds=15 data.seq_len=256 device=cpu run_dir=$O/hf_base
$F export $O/hf_base $O/base
H="model=hf model.name_or_path=$O/base model.from_config=null rounds=20 eval_every=5 eval.samples=3 device=cpu"
$F train $D $H model.lora.enabled=false run_dir=$O/hf_dialogue_full
$F train $D $H run_dir=$O/hf_dialogue_lora
$F train $P $H model.lora.enabled=false run_dir=$O/hf_functions_full
$F train $P $H run_dir=$O/hf_functions_lora
