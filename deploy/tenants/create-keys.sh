#!/usr/bin/env bash
# Creates API keys for three example tenants, in the Secret the gateways mount or in a key file
# (see README.md in this folder). Each key is printed once: hand it to the tenant; the store
# only keeps its SHA-256. Existing tenants and keys are kept.
#
# Usage: create-keys.sh --secret NAMESPACE/NAME    (e.g. llmops/llmops-gateway-keys; kubectl)
#        create-keys.sh [KEY_FILE]                 (default: ./keys.json)
set -euo pipefail

if [ "${1:-}" = "--secret" ]; then
    where=(--secret "${2:?usage: create-keys.sh --secret NAMESPACE/NAME}")
else
    where=(--store "${1:-keys.json}")
fi

# An interactive application: every model, the default limits.
echo "chat-app:   $(llmops keys create "${where[@]}" --tenant chat-app \
    --description 'customer chat front end')"

# Offline evaluation: two models, few requests but a large daily token budget.
echo "batch-eval: $(llmops keys create "${where[@]}" --tenant batch-eval \
    --model llama-3.1-8b-instruct --model llama-3.1-70b-instruct \
    --requests-per-minute 60 --tokens-per-minute 400000 --max-concurrent-streams 8 \
    --tokens-per-day 50000000 --description 'nightly evaluation jobs')"

# A trial: the small CPU model only, tight limits.
echo "trial:      $(llmops keys create "${where[@]}" --tenant trial \
    --model smollm2-135m-instruct \
    --requests-per-minute 10 --tokens-per-minute 5000 --max-concurrent-streams 2 \
    --tokens-per-day 100000 --description 'evaluation account')"
