"""``run_all.py --rounds``: the depths take turns, each row's medians pool every round's runs, and
a round that fails is not hidden behind the rounds that passed."""
from __future__ import annotations

from typing import Any

import pytest

from benchmarks import run_all


def _run(frames_per_s: float, correct: bool = True) -> dict[str, Any]:
    return {"frames": 100, "frames_per_s": frames_per_s, "mb_per_s": frames_per_s / 10, "latency_ms": 5.0,
            "sim_send_s": 0.1, "cpu_s": {"workers": 1.0}, "peak_mb": 50.0, "correct": correct,
            "problems": [] if correct else ["sum differs"], "extra": {"settings": {"workers": 2}}}


@pytest.fixture
def scripted(monkeypatch):
    """run_script answers from a queue of (depth -> result) and records the order of the calls."""
    calls: list[str] = []
    answers: dict[str, list[Any]] = {}

    def fake_run_script(depth: str, args: list[str]) -> tuple[Any, str]:
        calls.append(depth)
        assert args[args.index("--runs") + 1] == "2"
        answer = answers[depth].pop(0)
        return (answer, "") if answer is not None else (None, "exit status 1: ValueError: simulator gone")

    monkeypatch.setattr(run_all, "run_script", fake_run_script)
    return calls, answers


def test_rounds_take_turns_and_pool_the_runs(scripted):
    calls, answers = scripted
    answers["pipeline"] = [[_run(10), _run(11)], [_run(30), _run(31)], [_run(20), _run(21)]]
    answers["libertem-live"] = [[_run(5), _run(5)], [_run(9), _run(9)], [_run(6), _run(7)]]
    rows = run_all.measure_rounds("arina96", "sum+sumsig", ["pipeline", "libertem-live"], 3, 2, 2)
    # each round starts one depth further on: the first script after a pause runs slowest
    assert calls == ["pipeline", "libertem-live", "libertem-live", "pipeline", "pipeline", "libertem-live"]
    pipeline, theirs = rows  # rows keep the depths' order
    assert pipeline["runs"] == 6 and pipeline["rounds"] == 3
    assert pipeline["frames_per_s_each"] == [10, 11, 30, 31, 20, 21]
    assert pipeline["frames_per_s"] == 20.5  # the median of all six
    assert theirs["frames_per_s"] == 6.5
    run_all.add_ratios(rows)
    assert pipeline["ratio_vs_libertem_live"] == round(20.5 / 6.5, 2)
    assert pipeline["correct"] and theirs["correct"]


def test_a_failed_round_fails_the_row(scripted):
    calls, answers = scripted
    answers["device"] = [[_run(10), _run(11)], None]
    rows = run_all.measure_rounds("quadro512", "sum+sumsig", ["device"], 2, 2, 2)
    (row,) = rows
    assert row["runs"] == 2 and not row["correct"]
    assert any("1 of 2 rounds failed" in p and "simulator gone" in p for p in row["problems"])


def test_a_depth_that_never_ran_is_failed_with_its_error(scripted):
    calls, answers = scripted
    answers["device"] = [None]
    (row,) = run_all.measure_rounds("quadro512", "sum+sumsig", ["device"], 1, 2, 2)
    assert row["runs"] == 0 and not row["correct"]
    assert "simulator gone" in row["problems"][0]


def test_a_wrong_result_in_any_round_fails_the_row(scripted):
    calls, answers = scripted
    answers["pipeline"] = [[_run(10), _run(11)], [_run(12), _run(13, correct=False)]]
    (row,) = run_all.measure_rounds("arina96", "sum+sumsig", ["pipeline"], 2, 2, 2)
    assert not row["correct"] and row["problems"] == ["sum differs"]
