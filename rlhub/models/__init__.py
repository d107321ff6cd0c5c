"""Policy models: the tiny MoE built offline, and loading any local HF causal LM."""
