from rlhub.envs import ModelMessage, make_env

import rlhub_reverse


def test_reward_on_right_wrong_and_cut_off_answers():
    env = rlhub_reverse.load_environment()
    prompt, answer = env.reset({"word": "cab"})
    assert prompt == [{"role": "user", "content": "Reverse: cab"}] and answer == "bac"
    assert env.step(answer, ModelMessage("bac", "stop")).reward == 1.0
    assert env.step(answer, ModelMessage("cab", "stop")).reward == 0.0
    assert env.step(answer, ModelMessage("bac", "length")).reward == 0.0  # cut off before ending its turn


def test_splits_are_disjoint_and_found_by_name_once_installed():
    env = make_env("reverse_word", length=2)  # through the rlhub.envs entry point
    train, test = {r["word"] for r in env.dataset("train")}, {r["word"] for r in env.dataset("test")}
    assert train and test and not train & test
