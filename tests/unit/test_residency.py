"""The memory budget: least recently used idle models leave the device, come back on demand."""

from hypergen.engine.residency import MB, ModelResidency


def make(budget_mb):
    moves = []
    residency = ModelResidency(None if budget_mb is None else int(budget_mb * MB), move=lambda name, to: moves.append((name, to)))
    return residency, moves


def test_models_beyond_the_budget_are_offloaded_least_recently_used_first():
    residency, moves = make(25)
    residency.register("a", 10 * MB)
    residency.register("b", 10 * MB)
    assert moves == []
    residency.register("c", 10 * MB)  # 30 MB > 25: a (least recently used) leaves
    assert moves == [("a", False)]
    assert residency.snapshot()["offloaded"] == ["a"]
    residency.use("b")
    assert residency.use("a") is True  # back; c is now the least recently used
    assert moves[-2:] == [("c", False), ("a", True)]
    snapshot = residency.snapshot()
    assert snapshot["offloaded"] == ["c"] and snapshot["device_mb"] == 20 and snapshot["budget_mb"] == 25
    assert snapshot["models"]["a"] == {"on_device": True, "mb": 10, "offloads": 1, "reloads": 1}


def test_a_model_on_the_device_is_used_without_moves():
    residency, moves = make(25)
    residency.register("a", 10 * MB)
    assert residency.use("a") is False and moves == []


def test_no_budget_means_nothing_moves():
    residency, moves = make(None)
    for name in "abcdef":
        residency.register(name, 100 * MB)
    assert moves == [] and residency.snapshot()["budget_mb"] is None


def test_a_model_larger_than_the_budget_still_runs_alone():
    residency, moves = make(5)
    residency.register("small", 4 * MB)
    residency.register("huge", 10 * MB)
    assert moves == [("small", False)]
    assert residency.snapshot()["device_mb"] == 10  # over budget, but the model in use cannot leave
