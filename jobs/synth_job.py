"""``griffin-batch synthesize`` as a variant of the one job driver (``driver.Variant``).

Prompts come from a template rendered over variables (``jobs.synth_staging``);
from there the job is ``generate``'s: the same plan, shards, exactly-once
commits, progress checkpoints, ``--resume`` and summary. What differs:

* rows: one per (combination, sample), carrying the variables, the prompt, the
  sample index and the seed used (a column the worker writes: a redrawn sample's
  seed is not its first);
* ``--json-schema``: workers check each sample and draw rejected ones again with
  new seeds before writing a shard (``actors.redraw``); each row records its
  ``attempts``, whether it is ``valid`` and why not (``validation_error``);
* ``--dedup``: once every shard is committed, the deduplicated rows are written
  beside the committed parts (``jobs.synth_dedup``); ``_summary.json`` counts
  what exact and near matching removed, and how many rows are valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from griffin_batch.actors import output, shards, validation
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import (
    manifest,
    planner,
    staging,
    synth_checks,
    synth_dedup,
    synth_staging,
    synth_template,
    synth_vars,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What ``synthesize`` adds to a job's options.

    Attributes:
      template: ``--template``: a Jinja2 template file (any fsspec URL).
      template_text: ``--template-text``: the template itself (exclusive with ``template``).
      vars: ``--vars``: Parquet, CSV, JSONL or YAML file of combinations; None: one
        combination without variables.
      grid: ``--grid``: ``vars`` is a YAML mapping of lists; take their product.
      n: ``--n``: samples per combination, one output row each.
      dedup: ``--dedup``: ``exact``, ``near`` or ``none``.
      dedup_threshold: ``--dedup-threshold``: least estimated Jaccard similarity
        of a near duplicate.
      json_schema: ``--json-schema``: completions must be JSON valid under this
        schema file; None: no check.
      max_attempts: ``--max-attempts``: most draws of a sample the schema rejects
        (the first included).
    """

    template: str | None = None
    template_text: str | None = None
    vars: str | None = None
    grid: bool = False
    n: int = 1
    dedup: str = synth_dedup.EXACT
    dedup_threshold: float = 0.9
    json_schema: str | None = None
    max_attempts: int = 3

    def validate(self) -> None:
        """Raises ``JobInputError`` naming the first inconsistent option."""
        if (self.template is None) == (self.template_text is None):
            raise config_lib.JobInputError("give exactly one of --template FILE and "
                                           "--template-text TEXT")
        if self.grid and self.vars is None:
            raise config_lib.JobInputError("--grid needs --vars (a YAML mapping of lists)")
        if self.dedup not in synth_dedup.MODES:
            raise config_lib.JobInputError(
                f"--dedup must be one of {', '.join(synth_dedup.MODES)}, got {self.dedup!r}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise config_lib.JobInputError(
                f"--dedup-threshold must be in (0, 1], got {self.dedup_threshold}")
        if not 1 <= self.max_attempts <= 100:
            raise config_lib.JobInputError(
                f"--max-attempts must be in [1, 100], got {self.max_attempts}")

    def sources(self) -> tuple[str, ...]:
        """The files the prompts come from, as the job's inputs (the template's text when inline)."""
        given = tuple(u for u in (self.vars, self.template) if u is not None)
        return given or (synth_template.INLINE,)


class SynthesizeJob:
    """The ``driver.Variant`` of ``synthesize``; reads its files once, when built.

    Args:
      synth: The synthesize options (validated).

    Raises:
      JobInputError: The template, variables or schema cannot be read or are
        malformed (named).
    """

    def __init__(self, synth: SynthConfig):
        synth.validate()
        self.synth = synth
        self.template = synth_template.load(synth.template, synth.template_text)
        self.template.compile()  # a syntax error stops the job before anything else
        self.variables = (synth_vars.load(synth.vars, grid=synth.grid)
                          if synth.vars is not None else None)
        self.check, self.schema_sha256 = (synth_checks.load(synth.json_schema)
                                          if synth.json_schema else (None, None))

    def stage(self, config: config_lib.JobConfig, say: Callable[[str], None]
              ) -> tuple[config_lib.JobConfig, planner.JobPlan, staging.Staged]:
        """Renders the prompts into the job's staged input and plans it (``driver.Variant``)."""
        for warning in greedy_warnings(config.sampling, self.synth):
            say(warning)
        return synth_staging.stage(config, self.template, self.variables, self.synth.n, say)

    def fingerprint(self) -> Mapping[str, Any]:
        """What decides the rows beyond the job's options; a ``--resume`` must keep it."""
        s = self.synth
        return {"synthesize": {
            "template_sha256": self.template.sha256,
            "vars": s.vars, "grid": s.grid, "n": s.n,
            "json_schema_sha256": self.schema_sha256,
            "max_attempts": s.max_attempts if s.json_schema else None,
            "dedup": s.dedup,
            "dedup_threshold": s.dedup_threshold if s.dedup == synth_dedup.NEAR else None,
        }}

    def shard_options(self, options: shards.ShardOptions) -> shards.ShardOptions:
        """Every shard checks (and redraws) its samples, and records their seeds."""
        attempts = self.synth.max_attempts if self.check is not None else 1
        return dataclasses.replace(options, validation=validation.Validation(
            check=self.check, max_attempts=attempts))

    def finish(self, out: manifest.OutputDir, plan: planner.JobPlan,
               say: Callable[[str], None]) -> Mapping[str, Any]:
        """Deduplicates the committed rows and counts their validity, for the summary."""
        figures: dict[str, Any] = {"validation": _validity(out, plan)}
        if self.synth.dedup != synth_dedup.NONE:
            say(f"deduplicating ({self.synth.dedup}) into {out.url}/{manifest.DEDUP_DIR}/")
            counts = synth_dedup.write(out, plan, self.synth.dedup, self.synth.dedup_threshold)
            figures["dedup"] = counts.to_summary()
        else:
            figures["dedup"] = {"mode": synth_dedup.NONE}
        return figures


def greedy_warnings(sampling: config_lib.SamplingConfig, synth: SynthConfig) -> list[str]:
    """What greedy decoding (temperature 0, which ignores seeds) makes pointless here."""
    if sampling.temperature != 0:
        return []
    warnings = []
    if synth.n > 1:
        dedup = (f", and --dedup {synth.dedup} keeps one of them"
                 if synth.dedup != synth_dedup.NONE else "")
        warnings.append(
            f"warning: --n {synth.n} at --temperature 0 (greedy, the default): the {synth.n} "
            f"samples of each prompt will be identical{dedup}; pass --temperature above 0 "
            "(e.g. 0.7) for different samples")
    if synth.json_schema and synth.max_attempts > 1:
        warnings.append(
            f"warning: --max-attempts {synth.max_attempts} at --temperature 0 (greedy, the "
            "default): a redraw repeats the completion --json-schema rejected; pass "
            "--temperature above 0 (e.g. 0.7) for redraws that can differ")
    return warnings


def _validity(out: manifest.OutputDir, plan: planner.JobPlan) -> dict[str, Any]:
    """How many committed rows are valid, invalid or unchecked, and how many were redrawn."""
    counts = {"valid": 0, "invalid": 0, "unchecked": 0, "redrawn": 0}
    for spec in plan.shards:
        with out.fs.open(f"{out.path}/{output.part_name(spec.shard_id)}", "rb") as f:
            table = pq.read_table(f, columns=["valid", "attempts"])
        valid = table["valid"]
        counts["valid"] += int(pc.sum(pc.fill_null(valid, False)).as_py() or 0)
        counts["invalid"] += int(pc.sum(pc.fill_null(pc.invert(valid), False)).as_py() or 0)
        counts["unchecked"] += valid.null_count
        counts["redrawn"] += int(pc.sum(pc.greater(table["attempts"], 1)).as_py() or 0)
    return counts
