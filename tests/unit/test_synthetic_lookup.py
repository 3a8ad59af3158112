"""The demo world's multi-turn task: items, the lookup environment and its episode score."""

from opdplus.envs.base import Environment, is_multi_turn
from opdplus.envs.synthetic_lookup import LookupEnvironment
from opdplus.rollout.multiturn import assistant_turn_of_text
from opdplus.tasks.base import get_task
from opdplus.tasks.synthetic import split_of


def _play(env: Environment, *texts: str) -> list:
    return [env.step(assistant_turn_of_text(text)) for text in texts]


def test_items_are_seeded_split_and_consistent():
    task = get_task("synthetic_lookup")
    assert is_multi_turn(task)
    items = task.items("eval", 30, seed=3)
    assert [i.prompt for i in items] == [i.prompt for i in task.items("eval", 30, seed=3)]
    for item in items:
        assert split_of(item.prompt_text) == "eval" and item.task == "lookup"
        table, key = item.meta["table"], item.meta["key"]
        assert key in table and f"box {key}." in item.prompt_text
        assert 0 <= item.answer <= 12 and item.meta["turns"][1].endswith(f"#### {item.answer}")


def test_reference_episode_scores_one():
    task = get_task("synthetic_lookup")
    assert is_multi_turn(task)
    for item in task.items("train", 20):
        env = task.environment(item)
        call, answer = item.meta["turns"]
        first, last = _play(env, call, answer)
        assert first.messages == [{"role": "tool", "content": str(item.meta["table"][item.meta["key"]])}]
        assert first.tool_calls == 1 and first.tool_errors == 0 and not first.done
        assert last.done and env.score() == 1.0


def test_the_right_answer_without_the_tool_or_from_another_box_fails():
    env = LookupEnvironment({"a": 2, "b": 4, "c": 1}, key="b", answer=7)
    (reply,) = _play(env, " 3 + 4 = 7. #### 7")  # a lucky guess without calling the tool
    assert reply.done and env.score() == 0.0
    env = LookupEnvironment({"a": 2, "b": 4, "c": 1}, key="b", answer=7)
    first, _ = _play(env, ' lookup(box="a")', " 3 + 4 = 7. #### 7")
    assert first.messages[0]["content"] == "2" and env.score() == 0.0
    env = LookupEnvironment({"a": 2, "b": 4, "c": 1}, key="b", answer=7)
    _play(env, ' lookup(box="b")', " 3 + 2 = 5. #### 5")  # misread the tool's answer
    assert env.score() == 0.0


def test_bad_calls_are_answered_with_tool_errors():
    env = LookupEnvironment({"a": 2, "b": 4, "c": 1}, key="b", answer=7)
    malformed, unknown, no_box, right, done = _play(
        env, ' lookup(box="b"', ' weather(box="b")', ' lookup(box="z")', ' lookup(box="b")', " 3 + 4 = 7. #### 7"
    )
    for reply in (malformed, unknown, no_box):
        assert reply.tool_errors == 1 and not reply.done and reply.messages[0]["content"].startswith("error")
    assert right.messages == [{"role": "tool", "content": "4"}] and done.done and env.score() == 1.0
    assert env.record()["calls"] == [["weather({'box': 'b'})"], ["lookup({'box': 'z'})"], ["lookup({'box': 'b'})"]]
