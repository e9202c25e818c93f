"""Choosing one variant per layer: Puzzle's mixed-integer program, solved with scipy's HiGHS (`milp`).

x[i, j] ∈ {0, 1} says layer i takes variant j; Σ_j x[i, j] = 1 for every layer. The objective is any numeric
`metrics.*` (or `stats.*`) key of the block library, summed over layers and minimised (KL divergence) or
maximised (an accuracy); every budget is a bound on the layer sum of a key (`stats.runtime_ms ≤ 12`,
`stats.memory_mib ≤ 900`, a lower bound for a throughput-like key). Several solutions are found by adding,
after each one, a diversity cut Σ_{(i,j) ∈ previous} x[i, j] ≤ L − K: the next differs in at least K layers
(Puzzle's α-constraint with α = 1 − K/L).

An infeasible budget is explained: for each bound, the MIP is re-solved for the best total of that key under
the other bounds, and the message says which bound cannot be met and the tightest value that could.

HiGHS writes from C onto file descriptor 1 even with `disp=False` (scipy 1.17 on an 80 × 54 library under a
memory cap: "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();"), which corrupted
`tessera search solve --json`. Every solve therefore runs with fd 1 pointed at stderr (`c_stdout_to_stderr`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from tessera.errors import UserError
from tessera.search.library import Library, LibraryError, layer_names, value


@contextlib.contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for the duration, so C code (the HiGHS solver) cannot write into our
    stdout; fd 1 is restored on exit, exceptions included. Stderr rather than /dev/null: stdout stays clean for
    machine-readable output, and whatever the solver says (unasked: it runs with `disp=False`) is still there
    for whoever debugs it. Process-wide while it lasts: solves are not run concurrently with other output."""
    sys.stdout.flush()  # Python's buffered text goes out before fd 1 moves, in order
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        _flush_c_stdio()  # C's stdout buffer (full when fd 1 is a pipe) empties into stderr, not later into stdout
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    with contextlib.suppress(OSError, AttributeError):  # no C runtime reachable by name (Windows): nothing to do
        ctypes.CDLL(None).fflush(None)


MAX_RESOLVES = 16  # answers HiGHS's tolerance lets pass a bound, each excluded and the MIP solved again
ROUNDING = 1e-12  # relative: a total past its bound by no more than this is the sum's rounding, not an excess


class InfeasibleError(UserError):
    """No architecture in the library meets the budget; the message names the bound and what could be met, and
    `shortfalls` says it for a caller to put in its own terms (empty where no MIP was solved)."""

    def __init__(self, message: str, shortfalls: tuple[Shortfall, ...] = ()) -> None:
        super().__init__(message)
        self.shortfalls = shortfalls


@dataclass(frozen=True)
class Bound:
    key: str  # "stats.runtime_ms"
    upper: float | None = None
    lower: float | None = None

    def describe(self) -> str:
        parts = ([f"≥ {self.lower:g}"] if self.lower is not None else []) + (
            [f"≤ {self.upper:g}"] if self.upper is not None else []
        )
        return f"{self.key} {' and '.join(parts)}"


@dataclass(frozen=True)
class Shortfall:
    """A bound no choice meets under the other bounds, and the best total they allow: the smallest for an upper
    bound, the largest for a lower one."""

    bound: Bound
    upper: bool  # which side of the bound fails
    best: float


@dataclass
class Solution:
    objective: float
    choices: dict[str, str]  # layer key -> variant name
    totals: dict[str, float] = field(default_factory=dict)  # key -> sum over layers

    def to_json(self) -> dict:
        return {"objective": self.objective, "choices": self.choices, "totals": self.totals}


class _Problem:
    """The library flattened: variable k is (layer, variant); numeric columns per key, checked on first use."""

    def __init__(self, library: Library) -> None:
        self.library = library
        self.layers = layer_names(library)
        self.pairs = [(layer, name) for layer in self.layers for name in library[layer]]
        self.n = len(self.pairs)
        layer_of = np.repeat(np.arange(len(self.layers)), [len(library[layer]) for layer in self.layers])
        self.layer_starts = np.searchsorted(layer_of, np.arange(len(self.layers)))  # each layer's first variable
        self.layer_of = layer_of
        self.one_per_layer = csr_array(
            (np.ones(self.n), (layer_of, np.arange(self.n))), shape=(len(self.layers), self.n)
        )
        self._columns: dict[str, np.ndarray] = {}

    def column(self, key: str) -> np.ndarray:
        if key not in self._columns:
            if key.partition(".")[0] not in ("stats", "metrics") or not key.partition(".")[2]:
                raise LibraryError(f"key {key!r}: expected 'stats.<name>' or 'metrics.<name>'")
            col = np.empty(self.n)
            for k, (layer, name) in enumerate(self.pairs):
                v = value(self.library[layer][name], key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise LibraryError(f"{layer}/{name}: {key} is {v!r}; every variant needs a finite number there")
                col[k] = v
            self._columns[key] = col
        return self._columns[key]

    def solve(self, cost: np.ndarray, bounds: list[Bound], cuts: list[np.ndarray], cut_rhs: float) -> np.ndarray | None:
        """The 0/1 choice vector minimising cost·x, or None when infeasible.

        HiGHS works to absolute tolerances (a row may pass its bound by 1e-6, an optimum be missed by 1e-6 in the
        objective), which at a library's scales decide answers: KL values of 1e-6 per block beside no-op blocks'
        1.0, runtimes just past a bound. So each bound's row is scaled to a largest entry of 1; the objective is
        shifted by each layer's least cost (one variant per layer: the same argmin) and scaled so its smallest
        step is 1 (at most 1e7 times its largest: the solver's own numerics); and each answer is checked against
        the exact bounds: one that passes a bound is excluded (a cut on exactly that choice) and the MIP solved
        again, so no answer outside the budget is returned and none inside it is lost."""
        objective = self._conditioned(cost)
        rejected: list[np.ndarray] = []
        for _ in range(MAX_RESOLVES + 1):
            x = self._solve_once(objective, bounds, cuts, cut_rhs, rejected)
            if x is None or not any(self._passes(b, x) for b in bounds):
                return x
            rejected.append(x)
        raise RuntimeError(f"the MIP solver's answers kept passing the bounds {bounds} after {MAX_RESOLVES} re-solves")

    def _conditioned(self, cost: np.ndarray) -> np.ndarray:
        """cost less each layer's least, scaled so the smallest positive entry is 1 (capped at 1e7 x the
        largest's reach); the same minimiser for every feasible set."""
        shifted = cost - np.minimum.reduceat(cost, self.layer_starts)[self.layer_of]
        positive = shifted[shifted > 0]
        if not len(positive):
            return shifted
        return shifted / max(float(positive.min()), float(positive.max()) * 1e-7)

    def _passes(self, b: Bound, x: np.ndarray) -> bool:
        """Whether the choice x passes bound b (beyond its sum's rounding)."""
        total = float(self.column(b.key) @ x)
        over = b.upper is not None and total > b.upper + ROUNDING * max(1.0, abs(b.upper))
        return over or (b.lower is not None and total < b.lower - ROUNDING * max(1.0, abs(b.lower)))

    @staticmethod
    def _scale(col: np.ndarray) -> float:
        return max(float(np.abs(col).max(initial=0.0)), 1e-300)

    def _solve_once(
        self,
        cost: np.ndarray,
        bounds: list[Bound],
        cuts: list[np.ndarray],
        cut_rhs: float,
        rejected: list[np.ndarray],
    ) -> np.ndarray | None:
        constraints = [LinearConstraint(self.one_per_layer, 1, 1)]
        for b in bounds:
            col = self.column(b.key)
            scale = self._scale(col)
            lo = -np.inf if b.lower is None else b.lower / scale
            hi = np.inf if b.upper is None else b.upper / scale
            constraints.append(LinearConstraint((col / scale)[None, :], lo, hi))
        constraints += [LinearConstraint(cut[None, :], -np.inf, cut_rhs) for cut in cuts]
        # A rejected choice is excluded alone: at most L - 1 of its L variables again.
        constraints += [LinearConstraint(x[None, :], -np.inf, len(self.layers) - 1) for x in rejected]
        with c_stdout_to_stderr():
            res = milp(
                cost,
                constraints=constraints,
                integrality=np.ones(self.n),
                bounds=Bounds(0, 1),
                options={"mip_rel_gap": 1e-9},  # exact optimum: the tests compare against brute force
            )
        if res.status == 2:  # infeasible
            return None
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"the MIP solver stopped without an optimum (status {res.status}): {res.message}")
        return np.round(res.x)

    def shortfalls(self, bounds: list[Bound]) -> tuple[Shortfall, ...]:
        """Why no choice meets all bounds: each bound that fails under the others, and the best it could be."""
        found = []
        for b in bounds:
            others = [o for o in bounds if o is not b]
            col = self.column(b.key)
            if b.upper is not None:
                x = self.solve(col, others, [], 0)
                if x is not None and col @ x > b.upper:
                    found.append(Shortfall(b, True, float(col @ x)))
            if b.lower is not None:
                x = self.solve(-col, others, [], 0)
                if x is not None and col @ x < b.lower:
                    found.append(Shortfall(b, False, float(col @ x)))
        return tuple(found)

    @staticmethod
    def explain(bounds: list[Bound], shortfalls: tuple[Shortfall, ...]) -> str:
        reasons = [
            f"{s.bound.key} ≤ {s.bound.upper:g} cannot be met: the smallest total is {s.best:.6g}"
            if s.upper
            else f"{s.bound.key} ≥ {s.bound.lower:g} cannot be met: the largest total is {s.best:.6g}"
            for s in shortfalls
        ]
        if not reasons:
            reasons.append("the bounds " + "; ".join(b.describe() for b in bounds) + " conflict with one another")
        suffix = " under the other bounds" if len(bounds) > 1 else ""
        return "no architecture in the library meets the budget: " + "; ".join(r + suffix for r in reasons)


def solve(
    library: Library,
    objective: str = "metrics.kl_div",
    maximize: bool = False,
    bounds: list[Bound] | tuple[Bound, ...] = (),
    solutions: int = 1,
    min_diversity: int = 1,
) -> list[Solution]:
    """Up to `solutions` best architectures, each differing from all earlier ones in ≥ min_diversity layers.

    Raises InfeasibleError (with the failing bound and its best achievable total) when none exists; later
    solutions that the diversity cuts make infeasible are simply not returned."""
    if solutions < 1:
        raise UserError(f"solutions must be >= 1, got {solutions}")
    problem = _Problem(library)
    if not 0 <= min_diversity <= len(problem.layers):
        raise UserError(f"min_diversity must be in [0, {len(problem.layers)}] layers, got {min_diversity}")
    bounds = list(bounds)
    objective_col = problem.column(objective)
    cost = -objective_col if maximize else objective_col
    reported = list(dict.fromkeys([b.key for b in bounds] + [objective]))
    found: list[Solution] = []
    cuts: list[np.ndarray] = []
    for _ in range(solutions):
        x = problem.solve(cost, bounds, cuts, len(problem.layers) - max(1, min_diversity))
        if x is None:
            if not found:
                shortfalls = problem.shortfalls(bounds)
                raise InfeasibleError(problem.explain(bounds, shortfalls), shortfalls)
            break
        chosen = np.flatnonzero(x > 0.5)
        found.append(
            Solution(
                objective=float(objective_col[chosen].sum()),
                choices={problem.pairs[k][0]: problem.pairs[k][1] for k in chosen},
                totals={key: float(problem.column(key)[chosen].sum()) for key in reported},
            )
        )
        cuts.append(x)
    return found


def parse_bound(text: str, upper: bool) -> Bound:
    """'stats.runtime_ms=12.5' (from --max / --min) -> Bound."""
    key, sep, raw = text.partition("=")
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not sep or not key or not math.isfinite(number):
        flag = "--max" if upper else "--min"
        raise UserError(f"{flag} {text!r}: expected KEY=NUMBER, e.g. stats.runtime_ms=12.5")
    return Bound(key, upper=number) if upper else Bound(key, lower=number)


def merge_bounds(bounds: list[Bound]) -> list[Bound]:
    """One Bound per key: --max and --min on the same key become one two-sided bound, and a key bounded twice the
    same way keeps the tighter bound (every bound the user gave holds)."""
    merged: dict[str, Bound] = {}
    for b in bounds:
        old = merged.get(b.key, Bound(b.key))
        uppers = [u for u in (old.upper, b.upper) if u is not None]
        lowers = [v for v in (old.lower, b.lower) if v is not None]
        merged[b.key] = Bound(b.key, upper=min(uppers, default=None), lower=max(lowers, default=None))
    return list(merged.values())
