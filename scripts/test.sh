#!/usr/bin/env bash
# Set up (as scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RLHUB_CACHE="${RLHUB_CACHE:-$PWD/.cache/rlhub}" HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -ra "$@"
