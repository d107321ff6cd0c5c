"""Rollout engines behind one protocol (`base.RolloutEngine`): `hf` (built-in) and `vllm`."""
