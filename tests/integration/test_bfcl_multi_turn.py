"""BFCL v4 multi-turn as an environment: scripted episodes against the real backends (``bfcl-eval`` package)."""

from __future__ import annotations

import pytest

from opdplus.envs.base import AssistantTurn, MultiTurnTask, is_multi_turn
from opdplus.tasks.base import TaskItem, get_task

pytest.importorskip("bfcl_eval")

from opdplus.envs import bfcl_backends  # noqa: E402
from opdplus.envs.bfcl_multi_turn import MALFORMED, BfclMultiTurnTask  # noqa: E402

NOTES = "multi_turn_base_42"  # GorillaFileSystem + MathAPI; ground truth: touch / echo / wc, keyword arguments only
NOTES_TEXT = "Study diligently, practice programming, master algorithms."
NOTES_TRUTH = [
    [{"touch": {"file_name": "Notes2023.txt"}}],
    [
        {
            "echo": {
                "content": NOTES_TEXT,
                "file_name": "Notes2023.txt",
            }
        }
    ],
    [{"wc": {"file_name": "Notes2023.txt", "mode": "c"}}],
]
DONE = AssistantTurn(text="Done.")


@pytest.fixture(scope="module")
def task() -> BfclMultiTurnTask:
    return BfclMultiTurnTask(tool_timeout_s=2.0)


def _item(task: BfclMultiTurnTask, item_id: str) -> TaskItem:
    return next(item for item in task.split_items("eval") if item.id == item_id)


def _calls(*calls: dict) -> AssistantTurn:
    return AssistantTurn(text="[...]", calls=list(calls))


def test_task_registered_multi_turn_with_a_fixed_split(task: BfclMultiTurnTask) -> None:
    registered = get_task("bfcl_multi_turn_base")
    assert isinstance(registered, MultiTurnTask) and is_multi_turn(registered)
    train, evaluation = task.split_items("train"), task.split_items("eval")
    assert len(train) + len(evaluation) == 200
    assert not {i.id for i in train} & {i.id for i in evaluation}
    assert task.items("eval", 3) == evaluation[:3]
    assert [i.id for i in task.items("train", 5, seed=1)] == [i.id for i in task.items("train", 5, seed=1)]
    item = _item(task, NOTES)
    assert isinstance(item.prompt, list)
    system, user = item.prompt
    assert system["role"] == "system" and '"name": "touch"' in system["content"]
    assert '"name": "mean"' in system["content"]  # every function of every involved class
    assert user["role"] == "user" and user["content"] == item.meta["user_turns"][0][0]["content"]
    assert len(item.meta["user_turns"]) == 3 and "tools" not in item.meta
    templated = BfclMultiTurnTask(tool_prompt="template").split_items("eval")[0]
    assert isinstance(templated.prompt, list) and '"name"' not in templated.prompt[0]["content"]
    assert templated.meta["tools"][0]["type"] == "function"
    plain = BfclMultiTurnTask(prompt_format="plain").split_items("eval")[0].prompt
    assert isinstance(plain, str) and '"name": "' in plain and plain.endswith("\n\nassistant:")


def test_following_the_ground_truth_scores_one_and_records_calls_as_executed(task: BfclMultiTurnTask) -> None:
    env = task.environment(_item(task, NOTES))
    try:
        replies = []
        for turn_calls in NOTES_TRUTH:
            replies.append(env.step(_calls(*turn_calls)))
            replies.append(env.step(DONE))
        assert [r.done for r in replies] == [False] * 5 + [True]
        assert replies[0].messages == [{"role": "tool", "content": "None"}] and replies[0].tool_calls == 1
        assert replies[1].messages[0]["role"] == "user"  # the next user turn
        assert replies[4].messages == [{"role": "tool", "content": '{"count": 58, "type": "characters"}'}]
        assert env.score() == 1.0
        assert env.record() == {
            "calls": [
                [["touch(file_name='Notes2023.txt')"]],
                [[f"echo(content={NOTES_TEXT!r}, file_name='Notes2023.txt')"]],
                [["wc(file_name='Notes2023.txt', mode='c')"]],
            ]
        }
    finally:
        env.close()


def test_wrong_or_unfinished_episodes_score_zero(task: BfclMultiTurnTask) -> None:
    item = _item(task, NOTES)
    wrong = task.environment(item)
    unfinished = task.environment(item)
    try:
        for turn_calls in [
            NOTES_TRUTH[0],
            [{"echo": {"content": "wrong", "file_name": "Notes2023.txt"}}],
            NOTES_TRUTH[2],
        ]:
            wrong.step(_calls(*turn_calls))
            wrong.step(DONE)
        assert wrong.score() == 0.0 and "turn 1: state differs" in wrong.explanation
        unfinished.step(_calls(*NOTES_TRUTH[0]))
        unfinished.step(DONE)
        assert unfinished.score() == 0.0  # stopped by a limit before the last user turn ended
        silent = task.environment(item)
        assert [silent.step(DONE).done for _ in NOTES_TRUTH] == [False, False, True]
        assert silent.score() == 0.0 and silent.explanation.startswith("turn 0: no function call")
        assert silent.record() == {"calls": [[], [], []]}
    finally:
        wrong.close()
        unfinished.close()


def test_bad_calls_are_answered_with_tool_errors(task: BfclMultiTurnTask) -> None:
    env = task.environment(_item(task, NOTES))
    try:
        malformed = env.step(AssistantTurn(text="[touch(file_name=", malformed=True))
        assert malformed.messages == [{"role": "tool", "content": MALFORMED}] and malformed.tool_errors == 1
        calls = [
            {"eval": {"source": "1"}},
            {"_load_scenario": {"scenario": {}}},
            {"os.system": {"command": "true"}},
            {"__import__": {"name": "os"}},
            {"touch": {"file_name": "a.txt", "mode": 1}},
            {"touch": {"file_name": "ok.txt"}},
        ]
        reply = env.step(_calls(*calls))
        texts = [m["content"] for m in reply.messages]
        assert all(t.startswith(bfcl_backends.ERROR_PREFIX) for t in texts[:5]) and texts[5] == "None"
        assert "'eval' is not one of the available functions" in texts[0]
        assert "unexpected keyword argument 'mode'" in texts[4]
        assert (reply.tool_calls, reply.tool_errors, reply.done) == (6, 5, False)
        assert "is not a valid call" in texts[2]
        assert env.record() == {"calls": [[[bfcl_backends.call_string(*next(iter(c.items()))) for c in calls]]]}
    finally:
        env.close()


def test_a_hanging_backend_is_stopped_and_the_state_restored(task: BfclMultiTurnTask) -> None:
    env = task.environment(_item(task, NOTES))
    try:
        env.step(_calls(*NOTES_TRUTH[0]))
        hung = env.step(_calls({"logarithm": {"value": 2.0, "base": 3.0, "precision": 10**7}}, *NOTES_TRUTH[0]))
        assert hung.messages[0]["content"].startswith(bfcl_backends.ERROR_PREFIX + "no result within 2 s")
        assert "not run" in hung.messages[1]["content"] and hung.tool_errors == 2 and not hung.done
        listing = env.step(_calls({"ls": {}}))  # the file made before the stopped call is still there
        assert "Notes2023.txt" in listing.messages[0]["content"]
        env.step(DONE)
        for turn_calls in NOTES_TRUTH[1:]:
            env.step(_calls(*turn_calls))
            env.step(DONE)
        assert env.record()["calls"][0] == [
            ["touch(file_name='Notes2023.txt')"],
            ["ls()"],
        ]  # stopped call: not recorded
        assert env.score() == 1.0
    finally:
        env.close()


def test_steps_per_user_turn_are_capped(task: BfclMultiTurnTask) -> None:
    env = BfclMultiTurnTask(max_steps_per_turn=2).environment(_item(task, NOTES))
    try:
        replies = [env.step(_calls({"pwd": {}})) for _ in range(3)]
        assert [r.done for r in replies] == [False, False, True]
        assert env.score() == 0.0 and "more than 2 steps" in env.explanation
    finally:
        env.close()


def test_call_strings_parse_back_and_reject_code() -> None:
    call = bfcl_backends.call_string("f", {"a": 1, "b": "x'y", "c": [1.5, {"k": None}], "d": True})
    assert call == "f(a=1, b=\"x'y\", c=[1.5, {'k': None}], d=True)"
    assert bfcl_backends.parse_call_string(call) == ("f", [], {"a": 1, "b": "x'y", "c": [1.5, {"k": None}], "d": True})
    assert bfcl_backends.parse_call_string("sort('a.txt')") == ("sort", ["a.txt"], {})
    for code in ["os.system('ls')", "f(a=__import__('os'))", "f(**{'a': 1})", "f(a=1); g()", "[f(a=1)]", "f(a=x)"]:
        with pytest.raises(ValueError):
            bfcl_backends.parse_call_string(code)


def test_an_episode_past_the_model_context_is_flagged() -> None:
    import torch

    from opdplus.eval.runner import context_overflows
    from opdplus.rollout.types import RolloutBatch

    mask_B_T = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    zeros_B_T = torch.zeros(2, 6)
    batch = RolloutBatch(zeros_B_T.long(), mask_B_T, mask_B_T, zeros_B_T, prompt_len=3)
    assert context_overflows(batch, 5) == [False, True]
    assert context_overflows(batch, None) == [False, False]
