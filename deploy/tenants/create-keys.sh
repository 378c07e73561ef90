#!/usr/bin/env bash
# Creates API keys for three example tenants in a key file, ready to go into the Secret that
# the gateway mounts (see README.md in this folder). Each key is printed once: hand it to the
# tenant; the file only keeps its SHA-256.
#
# Usage: create-keys.sh [KEY_FILE]    (default: ./keys.json; existing tenants and keys are kept)
set -euo pipefail

store="${1:-keys.json}"

# An interactive application: every model, the default limits.
echo "chat-app:   $(llmops keys create --store "$store" --tenant chat-app \
    --description 'customer chat front end')"

# Offline evaluation: two models, few requests but a large daily token budget.
echo "batch-eval: $(llmops keys create --store "$store" --tenant batch-eval \
    --model llama-3.1-8b-instruct --model llama-3.1-70b-instruct \
    --requests-per-minute 60 --tokens-per-minute 400000 --max-concurrent-streams 8 \
    --tokens-per-day 50000000 --description 'nightly evaluation jobs')"

# A trial: the small CPU model only, tight limits.
echo "trial:      $(llmops keys create --store "$store" --tenant trial \
    --model smollm2-135m-instruct \
    --requests-per-minute 10 --tokens-per-minute 5000 --max-concurrent-streams 2 \
    --tokens-per-day 100000 --description 'evaluation account')"
