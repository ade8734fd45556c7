"""When periodic work is due."""

from pipeline.cadence import due, due_or_last


def test_due_every_n():
    assert [step for step in range(1, 11) if due(3, step)] == [3, 6, 9]
    assert not any(due(None, step) for step in range(1, 11))  # unset: never
    assert not any(due(0, step) for step in range(1, 11))
    assert not due(3, 0)  # nothing is due before the first step


def test_due_or_last_adds_the_final_step_only_when_set():
    assert [step for step in range(1, 11) if due_or_last(4, step, 10)] == [4, 8, 10]
    assert not any(due_or_last(None, step, 10) for step in range(1, 11))
