"""Bytes of one decoding sample's progress checkpoint (its state file) by prompt length.

The demo model prefills a text prompt of about each requested token length,
decodes one round, and its snapshot is stored as a worker stores it
(``snapshots.to_data`` then ``progress.encode_file``). Prints one JSON line:
per prompt, its tokens, the state file's bytes, and the bytes the previous
format (the whole prompt in the JSON) would have taken.

  python benchmarks/bench_snapshot_bytes.py [--tokens 1000 128000]
"""

from __future__ import annotations

import argparse
import json
import time

from griffin_batch import model
from griffin_batch.actors import progress
from griffin_batch.model import demo, engine, requests, snapshots
from griffin_batch.model.engine_config import EngineConfig

SENTENCE = "The keeper climbed the stairs of the lighthouse and lit the lamp again. "


def _prompt(tokenizer, tokens: int) -> str:
    """A text of about ``tokens`` tokens (repeated prose, scaled by its measured rate)."""
    per_sentence = len(tokenizer.encode(SENTENCE * 20)) / 20
    return SENTENCE * max(1, round((tokens - 1) / per_sentence))


def _state_file_bytes(snap, fingerprint: str, *, whole_prompt: bool) -> int:
    arrays, meta = snapshots.to_data(snap, "s0")
    if whole_prompt:  # what the previous format stored
        meta["request"] = snapshots.request_to_json(snap.request)
    return len(progress.encode_file(arrays, {"version": progress.FORMAT_VERSION,
                                             "fingerprint": fingerprint, "samples": [meta]}))


def measure(tokens: int, config, params, tokenizer) -> dict:
    """One prompt of about ``tokens`` tokens: its state file's bytes, now and before."""
    eng = engine.Engine(config, params, tokenizer, EngineConfig(num_slots=1, decode_steps=8))
    fingerprint = snapshots.model_fingerprint(config, eng.dtype, tokenizer.model_proto)
    request = requests.Request(request_id="0", prompt=_prompt(tokenizer, tokens),
                               params=requests.SamplingParams(max_tokens=32))
    start = time.perf_counter()
    stream = eng.stream([request])
    next(stream)  # the first chunk: the prompt is prefilled and the sample decodes
    (snap,) = eng.snapshot()
    return {"prompt_tokens": snap.prompt_len, "prompt_chars": len(request.prompt),
            "state_file_bytes": _state_file_bytes(snap, fingerprint, whole_prompt=False),
            "previous_format_bytes": _state_file_bytes(snap, fingerprint, whole_prompt=True),
            "prefill_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 128_000])
    args = parser.parse_args()
    config, params = model.load_checkpoint(demo.demo_checkpoint_path())
    tokenizer = model.load_tokenizer(demo.demo_tokenizer_path())
    rows = [measure(n, config, params, tokenizer) for n in args.tokens]
    print(json.dumps({"bench": "snapshot_bytes", "model": "demo", "samples": rows}))


if __name__ == "__main__":
    main()
