"""schedule.py: durations, the two learning-rate schedules, and planning the steps of a time budget."""
import math

import pytest

from dgl_crystalframer.errors import ConfigError
from dgl_crystalframer.schedule import Plan, Probe, Schedule, format_duration, parse_duration, plan_steps


def test_durations():
    assert parse_duration("90") == parse_duration("90s") == parse_duration(90) == 90.0
    assert parse_duration("10m") == 600.0 and parse_duration("1.5h") == 5400.0 and parse_duration("2h30m") == 9000.0
    assert parse_duration(" 10 min ") == 600.0
    for bad in ("", "ten minutes", "10x", "-5m", "0", 0, "5m-3s"):
        with pytest.raises(ConfigError, match="time budget"):
            parse_duration(bad)
    assert format_duration(42) == "42 s" and format_duration(754) == "12 min 34 s" and format_duration(7500) == "2 h 5 min"


def test_paper_schedule_is_the_reference_decay_frozen_for_swa():
    s = Schedule("paper", 5e-4, 4000.0)
    assert s.lr_at(0, None) == pytest.approx(5e-4)
    assert s.lr_at(4000, None) == pytest.approx(5e-4 * math.sqrt(0.5))
    plan = Plan(total_steps=10000, swa_start_step=100)
    assert s.lr_at(5000, plan) == s.lr_at(100, plan) == pytest.approx(5e-4 * math.sqrt(4000 / 4100))


def test_cosine_schedule_warms_up_and_anneals_to_zero():
    s = Schedule("cosine", 1e-3, warmup_steps=10)
    plan = Plan(total_steps=110, swa_start_step=90)
    lrs = [s.lr_at(t, plan) for t in range(110)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)  # linear warm-up
    assert lrs[10] == pytest.approx(1e-3)  # the peak, then monotone down
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.5e-3) and s.lr_at(110, plan) == pytest.approx(0.0, abs=1e-12)
    assert Schedule("cosine", 1e-3).lr_at(3, None) == 1e-3  # before a budget's plan: the start of the cosine
    with pytest.raises(ConfigError, match="unknown schedule"):
        Schedule("linear", 1e-3)


def test_probe_skips_the_warm_up_steps():
    p = Probe(skip=2)
    for seconds in (5.0, 3.0, 1.0, 1.2, 0.8):
        p.add(seconds)
    assert p.counted == 3 and p.seconds_per_step == pytest.approx(1.0)


def test_plan_fits_the_budget_with_validation_and_the_final_evaluation():
    # 100 steps per epoch at 0.5 s, 5 s per validation, 20 s for the end; 60 s spent, 30 steps done
    plan = plan_steps(600.0, 60.0, 30, 0.5, 100, 5.0, 20.0, swa_fraction=0.25)
    epochs = math.ceil(plan.total_steps / 100)
    spent = 60.0 + (plan.total_steps - 30) * 0.5 + epochs * 5.0 + 20.0
    assert spent <= 0.97 * 600.0 < spent + 0.5 + 5.0  # as many steps as fit, not one more
    assert plan.swa_start_step == plan.total_steps - round(0.25 * plan.total_steps)
    assert plan.budget_seconds == 600.0 and plan.planned_at_step == 30
    # a budget already spent still trains one step more than was done
    assert plan_steps(10.0, 60.0, 30, 0.5, 100, 5.0, 20.0, 0.2).total_steps == 31
    # stored in a checkpoint and read back
    assert Plan(**plan.as_dict()) == plan
