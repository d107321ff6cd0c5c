"""rlhub: asynchronous RL post-training for Mixture-of-Experts language models.

Rollout actors generate with an engine, groups stream through a Ray data store,
a learner applies GRPO-family updates, and weights flow back to the engines,
never letting a trained token be more than `max_staleness` versions old.
"""

__version__ = "0.1.0"
