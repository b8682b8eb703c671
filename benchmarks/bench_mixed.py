"""Mixed output lengths: continuous batching against static batches, in useful tokens/s.

Prints ONE JSON line:
    {"bench": "mixed", "requests": 64, "slots": 32, "useful_tokens": ...,
     "continuous_tokens_per_s": ..., "static_tokens_per_s": ..., "speedup": ...,
     "static_padding_fraction": ..., ...}

Workload: the reference model (``benchmarks/common.py``), ``--requests`` greedy
requests with ``--prompt``-token prompts and ``max_tokens`` drawn uniformly from
[``--min-tokens``, ``--max-tokens``] with a fixed seed; ``--slots`` slots. Useful
tokens are each request's own ``max_tokens`` (nothing stops early).

* continuous: every request handed to one ``Engine.generate``; a finished
  sample's slot takes the next request at once, the pending request with the
  largest ``max_tokens`` first (the engine's default).
* continuous_fifo: the same with ``longest_first=False`` (arrival order).
* static: requests in arrival order, ``slots`` at a time; every request of a
  batch generates as many tokens as the batch's longest (``max_tokens`` set to
  the batch maximum), as a static batcher would, and only each request's own
  tokens count. Batches run one after the other.

Both run on the same engine after a warm-up that compiles every program.

Usage (from the repository root): python benchmarks/bench_mixed.py [--requests 64]
    [--slots 32] [--min-tokens 16] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def continuous(engine, prompts, lengths) -> float:
    """Seconds to serve every request through one ``generate`` call."""
    out, seconds = common.run_engine(engine, common.requests(prompts, lengths))
    assert [len(out[str(i)]) for i in range(len(prompts))] == list(lengths)
    return seconds


def static(engine, prompts, lengths, slots) -> tuple[float, int]:
    """Seconds and tokens computed when each batch runs to its longest request."""
    seconds, computed = 0.0, 0
    for start in range(0, len(prompts), slots):
        batch = slice(start, start + slots)
        longest = max(lengths[batch])
        _, took = common.run_engine(engine, common.requests(prompts[batch], longest))
        seconds += took
        computed += longest * len(prompts[batch])
    return seconds, computed


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The mixed workload's options (``benchmarks/bench_tail.py`` replays the same one)."""
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)


def workload_lengths(args: argparse.Namespace) -> list[int]:
    """Each request's ``max_tokens``, drawn with the workload's seed."""
    rng = np.random.default_rng(args.seed)
    return rng.integers(args.min_tokens, args.max_tokens + 1, args.requests).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(parser)
    args = parser.parse_args()

    config = common.workload_config()
    params = common.workload_params(config)
    lengths = workload_lengths(args)
    prompts = common.token_prompts(args.requests, args.prompt, config.vocab_size, args.seed)
    engine = common.make_engine(config, params, num_slots=args.slots, decode_steps=32)
    # Same compiled programs (they are keyed by shapes), arrival-order admission.
    fifo = common.make_engine(config, params, num_slots=args.slots, decode_steps=32,
                              longest_first=False)
    common.log("warm-up ...")
    common.warm_up_engine(
        engine, max_position=args.prompt + args.max_tokens, prompt_len=args.prompt
    )
    before = engine.compile_counts()

    useful = sum(lengths)
    common.log("continuous ...")
    cont_s = continuous(engine, prompts, lengths)
    common.log("continuous, arrival order ...")
    fifo_s = continuous(fifo, prompts, lengths)
    common.log("static ...")
    static_s, computed = static(engine, prompts, lengths, args.slots)
    common.emit(
        {
            "bench": "mixed",
            "requests": args.requests,
            "slots": args.slots,
            "max_tokens_range": [args.min_tokens, args.max_tokens],
            "seed": args.seed,
            "useful_tokens": useful,
            "continuous_s": cont_s,
            "static_s": static_s,
            "continuous_fifo_s": fifo_s,
            "continuous_tokens_per_s": useful / cont_s,
            "continuous_fifo_tokens_per_s": useful / fifo_s,
            "static_tokens_per_s": useful / static_s,
            "speedup": static_s / cont_s,
            "speedup_fifo": static_s / fifo_s,
            "static_padding_fraction": 1 - useful / computed,
            "compiled_during_timing": sum(engine.compile_counts().values()) - sum(before.values()),
            **common.environment(),
        }
    )


if __name__ == "__main__":
    main()
