"""What tensor parallelism's all-reduces cost a decode step: the engine's decode step on the demo parent over 2 ranks
(gloo on CPU, NCCL on GPUs), with its all-reduces and, in interleaved rounds of the same run, with them skipped
(each rank's partial sums left as they are: wrong logits, the same work otherwise), against the step of one
process on the whole model.

Each rank times its own steps (the ranks step in lockstep: every step's collectives wait for the slower rank);
rank 0's medians are reported, with the spread over rounds. One all-reduce per sharded sublayer (GQA, SwiGLU,
linear) and one gather of the logits per step. `tessera bench parallel`.
"""

from __future__ import annotations

import statistics
from functools import partial
from unittest import mock

import torch

from tessera.demo import PARENT_DIR
from tessera.devices import median_ms, serving_dtype
from tessera.runtime.loader import load_model
from tessera.runtime.parallel import TensorParallel, backend_for, load_shard, run_ranks

from .harness import InTurns, Spread, decoding_engine

BATCHES = (1, 8)
PROMPT, ROUNDS, STEPS = 16, 7, 20
ROOM = 2 * ROUNDS * (STEPS + 1)  # decode steps a request has room for: every round of both kinds, warm-ups included


def _step_ms(engine, device: torch.device) -> float:
    """Median ms of STEPS decode steps (after one more, not timed)."""
    return median_ms(engine.step, device, min_reps=STEPS, budget_s=0)


def _unreduced_step_ms(engine, device: torch.device) -> float:
    """_step_ms with every all-reduce skipped (each rank's partial sums left as they are)."""
    with mock.patch.object(TensorParallel, "all_reduce", lambda self, x: x):
        return _step_ms(engine, device)


def _rank_steps(tp: TensorParallel, device: str) -> dict:
    dev = tp.device(device)
    model = load_shard(PARENT_DIR, tp, dev, serving_dtype(dev))
    reduces = sum(
        sub is not None and sub.tp is not None for layer in model.layers for sub in (layer.self_attn, layer.mlp)
    )
    out = {"all_reduces_per_step": reduces}
    for batch in BATCHES:
        with torch.inference_mode():
            engine = decoding_engine(model, batch, PROMPT, ROOM)
            # In turns, in the same order on every rank: the collectives stay matched.
            turns = InTurns(
                {"with": partial(_step_ms, engine, dev), "without": partial(_unreduced_step_ms, engine, dev)}
            )
            out[batch] = turns.run(ROUNDS).times
    return out


def run(device: torch.device, size: int = 2) -> dict:
    backend = backend_for(device)
    ranks = run_ranks(_rank_steps, size, device.type, backend=backend)
    mine = ranks[0]
    whole = load_model(PARENT_DIR, device, serving_dtype(device))
    rows = []
    for batch in BATCHES:
        with torch.inference_mode():
            engine = decoding_engine(whole, batch, PROMPT, ROOM)
            single = [_step_ms(engine, device) for _ in range(ROUNDS)]
        with_ms, without_ms = Spread.of(mine[batch]["with"]), Spread.of(mine[batch]["without"])
        rows.append(
            {
                "batch": batch,
                "single_process_step_ms": statistics.median(single),
                "tensor_parallel_step_ms": with_ms.median,
                "tensor_parallel_step_ms_range": [with_ms.low, with_ms.high],
                "without_all_reduces_step_ms": without_ms.median,
                "without_all_reduces_step_ms_range": [without_ms.low, without_ms.high],
                "all_reduce_ms_per_step": with_ms.median - without_ms.median,
                "all_reduce_share": (with_ms.median - without_ms.median) / with_ms.median,
            }
        )
    return {
        "model": "demo parent",
        "tensor_parallel_size": size,
        "backend": backend,
        "all_reduces_per_step": mine["all_reduces_per_step"],
        "rounds": ROUNDS,
        "steps_per_round": STEPS,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['tensor_parallel_size']} ranks ({result['backend']}), "
        f"{result['all_reduces_per_step']} all-reduces and one logits gather per decode step; medians of "
        f"{result['rounds']} interleaved rounds of {result['steps_per_round']} steps (range over rounds).\n",
        "| batch | one process ms | tensor parallel ms | without the all-reduces ms | all-reduces ms/step | share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lo, hi = r["tensor_parallel_step_ms_range"]
        lo2, hi2 = r["without_all_reduces_step_ms_range"]
        lines.append(
            f"| {r['batch']} | {r['single_process_step_ms']:.2f} | "
            f"{r['tensor_parallel_step_ms']:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{r['without_all_reduces_step_ms']:.2f} ({lo2:.2f}-{hi2:.2f}) | {r['all_reduce_ms_per_step']:.2f} | "
            f"{100 * r['all_reduce_share']:.0f} % |"
        )
    return "\n".join(lines)
