"""Prompts that cannot fit the model length are caught before a run starts (`rlhub.prompt_lengths`)."""

from __future__ import annotations

import pytest

from rlhub import prompt_lengths as pl


def test_sample_indices_spread_over_the_rows_ends_included():
    assert pl.sample_indices(5, 64) == [0, 1, 2, 3, 4]
    picked = pl.sample_indices(1000, 64)
    assert len(picked) == 64 and picked[0] == 0 and picked[-1] == 999 and picked == sorted(set(picked))


def test_lengths_are_the_rendered_prompts_tokens_and_failures_name_their_row(tokenizer):
    class Rows:
        def dataset(self, split):
            return [{"q": "x" * n} for n in (3, 30, 0, 7)]

        async def reset(self, row, index):
            if not row["q"]:
                raise KeyError(f"row {index} has an empty question")
            return [{"role": "user", "content": row["q"]}], None

    env = Rows()
    found = pl.measure(env, env.dataset("train"), tokenizer, max_model_len=40, max_new_tokens=4, timeout_s=5)
    text = {i: tokenizer.apply_chat_template([{"role": "user", "content": "x" * n}], add_generation_prompt=True, tokenize=False)
            for i, n in ((0, 3), (1, 30), (3, 7))}
    rendered = {i: len(tokenizer.encode(t, add_special_tokens=False)) for i, t in text.items()}
    assert found.lengths == rendered and found.room == 36
    assert found.failed == {2: "KeyError: 'row 2 has an empty question'"}
    assert found.fits == sum(n <= 36 for n in rendered.values()) == 2


def test_the_verdict_stops_below_a_quarter_warns_below_all_and_names_the_setting():
    none_fit = pl.PromptLengths({i: 330 + i for i in range(10)}, room=252)
    error, warning = pl.verdict(none_fit, max_new_tokens=4, max_model_len=256, positions=256)
    assert warning is None and "0 of 10 sampled prompts fit (0%)" in error and "330-339 tokens" in error
    assert "needs 343 positions; the model takes at most 256 positions: shorten the prompts" in error
    some = pl.PromptLengths({0: 10, 1: 10, 2: 10, 3: 30}, room=20)
    error, warning = pl.verdict(some, max_new_tokens=4, max_model_len=24, positions=None)
    assert error is None and "About 25% of the groups will be dropped" in warning and "set rollout.max_model_len=34" in warning
    assert pl.verdict(pl.PromptLengths({0: 5}, room=20), 4, 24, None) == (None, None)
    failed = pl.PromptLengths({}, room=20, failed={4: "KeyError: 'q'"})
    assert "failed on every one of the 1 sampled rows, e.g. row 4: KeyError: 'q'" in pl.verdict(failed, 4, 24, None)[0]


def test_a_run_whose_prompts_cannot_fit_stops_before_ray_with_the_lengths(tmp_path):
    from rlhub.actors.controller import check_env, check_prompt_lengths
    from rlhub.config import ConfigError, load_config
    from rlhub.models.build import resolve_model_path

    cfg = load_config(["rollout.max_model_len=10", f"run_dir={tmp_path}"])  # "max(a,b)=" prompts do not fit 10 - 4 tokens
    with pytest.raises(ConfigError, match=r"env.name='arithmetic': rollout.max_model_len=10 leaves 6 prompt tokens .* 0 of 64 sampled"):
        check_prompt_lengths(cfg, check_env(cfg), resolve_model_path(cfg.model))
    fine = load_config([f"run_dir={tmp_path}"])
    check_prompt_lengths(fine, check_env(fine), resolve_model_path(fine.model))
