"""Prefill memory of ``forward_logits`` on a long prompt, one-shot vs chunked.

Memory is XLA's own accounting of the compiled program (``memory_analysis``):
temporaries plus outputs, exact and free of allocator noise. The chunked
program is also run to report tokens/s; the one-shot one at 32k tokens would
need tens of GB, so it is only compiled.

Prints one JSON line.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from griffin_batch.model import griffin
from griffin_batch.model.config import GriffinConfig, griffin_pattern


def compiled_bytes(config, params, tokens, chunk_size):
    compiled = griffin._forward_logits.lower(config, params, tokens, chunk_size).compile()
    mem = compiled.memory_analysis()
    return {"temp_mb": mem.temp_size_in_bytes / 2**20,
            "output_mb": mem.output_size_in_bytes / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--run", action="store_true", help="also time the chunked prefill")
    args = parser.parse_args()
    config = GriffinConfig(
        vocab_size=1024, width=256, mlp_expanded_width=768, num_heads=4, lru_width=256,
        block_types=griffin_pattern(6), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=2048, logits_soft_cap=30.0)
    params = griffin.init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, args.tokens), 0, config.vocab_size)
    result = {"bench": "forward_memory", "tokens": args.tokens, "chunk": args.chunk,
              "backend": jax.default_backend(),
              "one_shot": compiled_bytes(config, params, tokens, None),
              "chunked": compiled_bytes(config, params, tokens, args.chunk)}
    for short in (args.tokens // 8, args.tokens // 2):
        result[f"chunked_{short}"] = compiled_bytes(config, params, tokens[:, :short], args.chunk)
    if args.run:
        griffin.forward_logits(config, params, tokens[:, :1024], chunk_size=args.chunk)
        t0 = time.perf_counter()
        jax.block_until_ready(griffin.forward_logits(config, params, tokens, chunk_size=args.chunk))
        result["chunked_tokens_per_s"] = args.tokens / (time.perf_counter() - t0)
    print(json.dumps(result))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
