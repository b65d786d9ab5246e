#!/bin/bash
# The empirical-epsilon table of the README (Privacy, "Measured privacy"): audit=epsilon beside the
# accountants, for noise multipliers 0, 0.3, 1, 3. Then: python -m benchmarks.quality.epsilon_table OUT
# - tinyshakespeare by speaker, + 78 canary clients: q = 15/234 = 10/156; 50 rounds; tiny_gpt, and
#   LoRA (r 8) on a GPT-2-shaped model from config; 10 Secret Sharer canaries beside (exposure).
# - data=synthetic with 1000 clients + 500 canary clients, q = 0.1 (150 a round), model=logreg.
# Usage: bash benchmarks/quality/epsilon_audit.sh OUT [synthetic|tiny_gpt|lora ...]
set -e
O=${1:?output folder}; shift; F=.venv/bin/fedrun; DATA=${DATA:-../shared/data/tinyshakespeare.txt}
P="privacy=central_dp sampler.kind=poisson privacy.delta=1e-5 rounds=50 eval_every=25 device=cpu"
TEXT="data=shakespeare data.path=$DATA audit=epsilon audit.canary_clients=78 sampler.clients_per_round=15 audit.num_canaries=10"
SYN="data=synthetic data.num_clients=1000 model=logreg audit=epsilon audit.canary_clients=500 sampler.clients_per_round=150"
for what in "${@:-synthetic tiny_gpt lora}"; do
  for z in 0 0.3 1 3; do
    case $what in
      synthetic) $F train $P $SYN privacy.noise_multiplier=$z run_dir=$O/synthetic_z$z ;;
      tiny_gpt) $F train $P $TEXT privacy.noise_multiplier=$z run_dir=$O/tiny_gpt_z$z ;;
      lora) $F train $P $TEXT model=hf privacy.noise_multiplier=$z run_dir=$O/lora_z$z ;;
    esac
  done
done
