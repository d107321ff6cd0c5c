"""Shared fixtures: the tiny MoE built once per session, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from rlhub.models.build import ModelConfig, build_tiny_moe

    root = os.environ.get("RLHUB_CACHE")
    base = tmp_path_factory.mktemp("models") if not root else None
    return str(build_tiny_moe(ModelConfig(), root=base))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
