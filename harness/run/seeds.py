"""Seeds until precise: a suite whose ``seeds:`` is a rule (``{first, max, until:
{gain_ci_half_width}}``) runs every cell on seeds 0 .. first-1, then, round after round,
adds seeds to each cell (the method and the student alone, paired) whose gain's 95%
interval is wider than the target, until it is narrow enough or the cell has ``max``
seeds. Only the interval's width is looked at, never whether it excludes zero: stopping
on significance biases the result. How many seeds a cell gets next is projected from
its paired differences' spread (the smallest n whose t-interval would meet the target),
at least one more, at most ``max``."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from scipy import stats

from collections.abc import Callable

from harness.store import results
from harness.store.report import leaderboard
from harness.suite.load import Suite

Cell = tuple[str, str, str, str]      # (dataset, teacher, student, method label)


def rule_of(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A suite's seed rule, or None when ``seeds:`` is a list."""
    seeds = doc.get("seeds")
    return dict(seeds) if isinstance(seeds, dict) else None


def _projected(n: int, half: float, target: float, most: int) -> int:
    """The smallest seed count whose interval would be at most ``target`` wide on each
    side, given ``n`` paired seeds whose interval is ``half`` wide now."""
    if n < 2 or not math.isfinite(half):
        return min(most, n + 1)
    sd = half * math.sqrt(n) / float(stats.t.ppf(0.975, n - 1))
    for m in range(n + 1, most + 1):
        if float(stats.t.ppf(0.975, m - 1)) * sd / math.sqrt(m) <= target:
            return m
    return most


def cell_seeds(suite: Suite) -> dict[Cell, set[int]]:
    """The seeds of each distilled cell of the suite's matrix."""
    current: dict[Cell, set[int]] = defaultdict(set)
    for t in suite.student_trials():
        if t.method_name != "none" and t.teacher:
            current[(t.dataset["name"], t.teacher["name"], t.model["name"], t.method)].add(t.seed)
    return current


def more_seeds(suite: Suite, rule: dict[str, Any]) -> dict[Cell, list[int]] | None:
    """Every cell's seeds for the next round (None when no cell needs more): a cell whose
    gain's interval is wider than the target, and which has fewer than ``max`` seeds and
    no failed trial, gets seeds up to its projected count; the student alone of each
    pair gets the union of its methods' seeds (the gains are paired)."""
    current = cell_seeds(suite)
    if not current:
        return None
    board = leaderboard(results.read_results(suite.output))
    target, most = float(rule["until"]["gain_ci_half_width"]), int(rule["max"])
    plan: dict[Cell, list[int]] = {key: sorted(seeds) for key, seeds in current.items()}
    grown = False
    for row in board.itertuples() if not board.empty else []:
        key = (row.dataset, row.teacher, row.student, row.method)
        if key not in current:
            continue
        half = (row.gain_hi - row.gain_lo) / 2
        have = sorted(current[key])
        if (math.isfinite(half) and half <= target) or len(have) >= most or row.n < len(have):
            continue                  # precise; at its maximum; or a trial failed (that needs a look first)
        want = _projected(int(row.n), half, target, most)
        plan[key] = have + [max(have) + 1 + i for i in range(want - len(have))]
        grown = True
    if not grown:
        return None
    for (ds, teacher, student, _), seeds in list(plan.items()):
        alone = (ds, teacher, student, "none")
        plan[alone] = sorted(set(plan.get(alone, [])) | set(seeds))
    return plan


def seed_rounds(suite: Suite, summary: dict[str, Any], reload: Callable[[dict[Cell, list[int]]], Suite],
                **run: Any) -> Suite:
    """Under a seed rule: rounds that add seeds to the cells whose gain is not yet precise
    (:func:`more_seeds`), each a run of the pending trials of the suite ``reload`` gives
    for that plan (``run``: run_suite's session arguments); their trials join
    ``summary``. Returns the suite as last run."""
    from . import matrix
    rule = rule_of(suite.doc)
    round_no = 1
    while rule:
        plan = more_seeds(suite, rule)
        if plan is None:
            break
        round_no += 1
        had = cell_seeds(suite)
        grown = [f"{k[3]} on {k[0]} ({k[1]} -> {k[2]}): {len(had[k])} -> {len(v)} seeds"
                 for k, v in plan.items() if k in had and len(v) > len(had[k])]
        print(f"\nseeds until precise, round {round_no}: {'; '.join(grown)}", flush=True)
        checked, suite = suite.data_checks, reload(plan)
        suite.data_checks = checked       # the data as checked before round 1: its warnings go on every row
        summary["trials"] += matrix.run_suite(suite, resume=True, **run)["trials"]
    return suite
