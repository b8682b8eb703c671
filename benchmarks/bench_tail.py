"""Why arrival order caps continuous batching on CPU: the cost of a decode round by busy
slots, and the mixed workload's schedules replayed against that cost.

Prints ONE JSON line:
    {"bench": "tail", "round_cost": {"1": ..., ..., "32": ...}, "bounds": {...}, ...}

``round_cost``: seconds of one decode round (``decode_steps`` steps) with k busy
slots, as a fraction of the round with every slot busy, measured on the
engine as built (its small rounds included: at most a quarter or half of the
slots busy decode a batch of that size). ``batch_cost``: the same for an engine of exactly k
slots, all busy: what a round would cost if it could always shrink to its
busy slots. Each k serves k requests twice, for 2 and 6 rounds, and the
round cost is the difference over 4 rounds, so prefill and compilation drop
out.

``bounds``: ``benchmarks/bench_mixed.py``'s workload (same arguments, same
seed) replayed round by round. Every request needs ceil((max_tokens - 1) /
decode_steps) rounds (the first token comes from prefill); a slot that frees
takes the next request at the next round. Speedup over static batches
(``slots`` requests at a time, each batch as long as its longest request, all
slots busy):

* ``measured_cost``: each round costs ``round_cost`` at its busy slots;
* ``batch_cost``: each round costs ``batch_cost`` at its busy slots;
* ``rows_only``: a round costs in proportion to its busy slots (an engine
  whose rounds cost nothing but each busy row's own work, the most any
  admission in this order can get: static's padding is then all it saves);

each for arrival order and for longest first. Attention is not modelled:
rounds are timed at short rings, where both schedules pay the same.

Usage (from the repository root): python benchmarks/bench_tail.py [--requests 64]
    [--slots 32] [--min-tokens 16] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import bench_mixed, common  # noqa: E402


def round_cost(engine_of, busy: list[int], r1: int, r2: int, steps: int, prompt: int,
               vocab: int) -> dict[int, float]:
    """Seconds per decode round at each number of busy slots (see the module docstring);
    ``engine_of(k)``: the engine that serves k requests."""
    out = {}
    for k in busy:
        engine = engine_of(k)
        prompts = common.token_prompts(k, prompt, vocab, seed=k)
        seconds = []
        for rounds in (r1, r2):
            reqs = common.requests(prompts, 1 + rounds * steps)
            common.run_engine(engine, reqs)  # compiles what this shape needs
            seconds.append(min(common.run_engine(engine, reqs)[1] for _ in range(2)))
        out[k] = (seconds[1] - seconds[0]) / (r2 - r1)
    return out


def replay(rounds_needed: list[int], slots: int, cost) -> float:
    """Total cost of serving requests in the given order, ``slots`` at a time, continuously."""
    pending = list(rounds_needed)
    left: list[int] = []  # rounds left of each busy slot
    total = 0.0
    while pending or left:
        while pending and len(left) < slots:
            left.append(pending.pop(0))
        total += cost(len(left))
        left = [r - 1 for r in left if r > 1]
    return total


def static_cost(rounds_needed: list[int], slots: int, full: float) -> float:
    return sum(max(rounds_needed[i:i + slots]) * full for i in range(0, len(rounds_needed), slots))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_mixed.add_workload_args(parser)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    args = parser.parse_args()

    config = common.workload_config()
    params = common.workload_params(config)
    engine = common.make_engine(config, params, num_slots=args.slots, decode_steps=args.steps)
    busy = sorted({1, 2, 4, 8, args.slots // 4 + 1, args.slots // 2, 3 * args.slots // 4,
                   args.slots})
    common.log(f"round cost at {busy} busy slots ...")
    seconds = round_cost(lambda k: engine, busy, 2, 6, args.steps, args.prompt,
                         config.vocab_size)
    common.log(f"batch cost at {busy} slots ...")
    batch_seconds = round_cost(
        lambda k: common.make_engine(config, params, num_slots=k, decode_steps=args.steps),
        busy, 2, 6, args.steps, args.prompt, config.vocab_size)
    full = seconds[args.slots]

    def interpolate(table):  # linear between measured points
        return lambda k: float(np.interp(k, busy, [table[b] for b in busy]))

    def rows_only(k: int) -> float:
        return full * k / args.slots

    lengths = bench_mixed.workload_lengths(args)
    needed = [math.ceil((n - 1) / args.steps) for n in lengths]
    static = static_cost(needed, args.slots, full)
    orders = {"arrival": needed, "longest_first": sorted(needed, reverse=True)}
    bounds = {f"{model}_{order}": static / replay(rounds, args.slots, cost)
              for model, cost in (("measured_cost", interpolate(seconds)),
                                  ("batch_cost", interpolate(batch_seconds)),
                                  ("rows_only", rows_only))
              for order, rounds in orders.items()}
    common.emit({
        "bench": "tail", "requests": args.requests, "slots": args.slots,
        "max_tokens_range": [args.min_tokens, args.max_tokens], "seed": args.seed,
        "decode_steps": args.steps, "full_round_s": full,
        "round_cost": {str(k): seconds[k] / full for k in busy},
        "batch_cost": {str(k): batch_seconds[k] / full for k in busy},
        "static_padding_fraction": 1 - sum(lengths) / sum(
            max(lengths[i:i + args.slots]) * len(lengths[i:i + args.slots])
            for i in range(0, len(lengths), args.slots)),
        "bounds": bounds, **common.environment(),
    })


if __name__ == "__main__":
    main()
