"""Long generation: tokens/s and resident memory as outputs grow to 16k tokens.

Prints ONE JSON line:
    {"bench": "long", "batch": 8, "tokens": 16384,
     "griffin": {"windows": [{"end": 1024, "tokens_per_s": ..., "rss_mb": ...}, ...],
                 "speed_after_2k_min_over_max": ..., "rss_end_over_1k": ...},
     "transformer": {"windows": [...], ...}, ...}

Each model runs in its own process (so memory is its own): ``--batch`` sequences
of greedy output, ``--tokens`` new tokens each. ``windows`` reports, for each
window ending at 1k, 2k, 4k, 8k and 16k generated tokens per sequence, the
window's tokens/s (all sequences) and the resident memory (process and
children) at its end. Every program is compiled before timing starts.

* griffin: our engine on the reference workload (``benchmarks/common.py``).
  Its state is fixed-size, so after the attention ring fills (2k tokens)
  speed and memory should stay flat.
* transformer: ``common.GlobalAttentionLM``, the same width, depth and heads
  with global attention and a KV cache that doubles when full: speed falls and
  memory grows with length. It starts from BOS (no prompt); ``--transformer-tokens``
  can stop it earlier, because its late windows are slow.

``--width`` and ``--window`` shrink the model (both sides alike) so that long
outputs fit a short run on a CPU; ``--windows`` sets the window ends;
``--plot PATH`` draws tokens/s against output length for both models as a PNG
(figure 1a; needs the ``bench`` extra, matplotlib).

Usage (from the repository root): python benchmarks/bench_long.py [--tokens 16384]
    [--batch 8] [--transformer-tokens N] [--skip-transformer] [--width W] [--window N]
    [--windows 256,512,...] [--plot docs/figure1a.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from griffin_batch.model import griffin  # noqa: E402

WINDOW_ENDS = (1024, 2048, 4096, 8192, 16384)
DECODE_STEPS = 32


def window_ends(tokens: int, ends: tuple[int, ...] = WINDOW_ENDS) -> list[int]:
    return [e for e in ends if e < tokens] + [tokens]


def model_config(args):
    """The reference workload, narrowed by ``--width`` and ``--window`` when given."""
    overrides = {}
    if args.width:
        overrides.update(width=args.width, mlp_expanded_width=3 * args.width, lru_width=args.width)
    if args.window:
        overrides.update(attention_window_size=args.window)
    return common.workload_config(**overrides)


class WindowClock:
    """Records (generated per sequence, time, RSS) as generation crosses each window end."""

    def __init__(self, ends: list[int], batch: int):
        self.ends, self.batch = ends, batch
        self.marks = [(0, time.perf_counter(), common.rss_mb())]

    def update(self, generated: int) -> None:
        while len(self.marks) <= len(self.ends) and generated >= self.ends[len(self.marks) - 1]:
            self.marks.append((generated, time.perf_counter(), common.rss_mb()))

    def summary(self) -> dict:
        windows = []
        for (n0, t0, _), (n1, t1, rss) in zip(self.marks, self.marks[1:], strict=False):
            windows.append(
                {
                    "start": n0,
                    "end": n1,
                    "rss_mb": rss,
                    "tokens_per_s": self.batch * (n1 - n0) / (t1 - t0),
                }
            )
        out = {"windows": windows, "rss_start_mb": self.marks[0][2]}
        late = [w["tokens_per_s"] for w in windows if w["start"] >= 2048]  # ring full
        if len(late) > 1:
            out["speed_after_2k_min_over_max"] = min(late) / max(late)
        if windows:
            out["rss_end_over_1k"] = windows[-1]["rss_mb"] / windows[0]["rss_mb"]
        return out


def child_griffin(args) -> dict:
    config = model_config(args)
    params = common.workload_params(config)
    engine = common.make_engine(config, params, num_slots=args.batch, decode_steps=DECODE_STEPS)
    common.warm_up_engine(engine, max_position=args.prompt + args.tokens, prompt_len=args.prompt)
    prompts = common.token_prompts(args.batch, args.prompt, config.vocab_size, seed=1)
    clock = WindowClock(window_ends(args.tokens, args.windows), args.batch)
    generated = 0
    for chunk in engine.stream(common.requests(prompts, args.tokens)):
        if chunk.request_id == "0":
            generated += len(chunk.tokens)
            clock.update(generated)
    return {
        "decode_steps": DECODE_STEPS,
        "params": common.param_count(params),
        **clock.summary(),
        "state_mb": griffin.cache_bytes(engine.cache) / 2**20,
    }


def child_transformer(args) -> dict:
    config = model_config(args)
    lm = common.GlobalAttentionLM(config, args.batch, steps=DECODE_STEPS)
    lm.compile_up_to(args.tokens)
    lm.decode([common.BOS] * args.batch)  # untimed: the first call's one-off costs
    lm.restart()
    tokens = [common.BOS] * args.batch
    clock = WindowClock(window_ends(args.tokens, args.windows), args.batch)
    while lm.position < args.tokens:
        tokens = lm.decode(tokens)[:, -1]
        clock.update(lm.position)
    return {
        "decode_steps": DECODE_STEPS,
        "params": lm.num_params(),
        **clock.summary(),
        "kv_cache_mb": lm.kv_bytes() / 2**20,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--transformer-tokens", type=int, default=None)
    parser.add_argument("--skip-transformer", action="store_true")
    parser.add_argument("--width", type=int, help="model width (default: the workload's 512)")
    parser.add_argument("--window", type=int, help="attention window (default: 2048)")
    parser.add_argument("--windows", type=_ends, default=WINDOW_ENDS,
                        help="comma-separated window ends, in generated tokens per sequence")
    parser.add_argument("--plot", help="write figure 1a (tokens/s against length) to this PNG")
    parser.add_argument("--child", choices=("griffin", "transformer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = child_griffin if args.child == "griffin" else child_transformer
        common.emit(run(args))
        return

    base = [f"--batch={args.batch}", f"--prompt={args.prompt}",
            f"--windows={','.join(map(str, args.windows))}"]
    base += [f"--width={args.width}"] if args.width else []
    base += [f"--window={args.window}"] if args.window else []
    config = model_config(args)
    result = {"bench": "long", "batch": args.batch, "tokens": args.tokens,
              "window_ends": window_ends(args.tokens, args.windows),
              "config": {"width": config.width, "blocks": len(config.block_types),
                         "window": config.attention_window_size, "vocab": config.vocab_size,
                         "heads": config.num_heads},
              **common.environment()}
    common.log("griffin ...")
    result["griffin"] = common.run_child(
        __file__, base + ["--child=griffin", f"--tokens={args.tokens}"]
    )
    if not args.skip_transformer:
        common.log("transformer ...")
        tokens = args.transformer_tokens or args.tokens
        result["transformer"] = common.run_child(
            __file__, base + ["--child=transformer", f"--tokens={tokens}"]
        )
    if args.plot:
        result["plot"] = args.plot
        plot(result, args.plot)
    common.emit(result)


def _ends(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(x) for x in text.split(",")))


def plot(result: dict, path: str) -> None:
    """Figure 1a: each model's tokens/s in each window, against generated tokens per sequence."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    c = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for key, label, style in (("griffin", f"Griffin, our engine (window {c['window']})", "o-"),
                              ("transformer", "global-attention transformer (KV cache)", "s--")):
        if key in result:
            windows = result[key]["windows"]
            ax.plot([w["end"] for w in windows], [w["tokens_per_s"] for w in windows], style,
                    label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["window_ends"], [str(e) for e in result["window_ends"]])
    ax.minorticks_off()
    ax.set_xlabel("generated tokens per sequence (end of window)")
    ax.set_ylabel("tokens/s in the window (all sequences)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"Decode throughput against output length (figure 1a)\nwidth {c['width']}, "
                 f"{c['blocks']} blocks, {c['heads']} heads, vocab {c['vocab']}, "
                 f"batch {result['batch']}, {result['backend']}, {result['cpus']} cores",
                 fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
