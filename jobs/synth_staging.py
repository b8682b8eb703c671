"""``griffin-batch synthesize``'s prompts become the Parquet input of an ordinary job.

At plan time the template is rendered over every combination of the variables
(``jobs.synth_vars``, ``jobs.synth_template``) and each prompt is written ``n``
times, one row per sample, to one Parquet file in a local scratch directory;
the job is planned from that file as from any Parquet input and the file goes to
``<output>/_manifest/inputs/`` once the output is checked (``staging.Staged``,
as OpenAI batch files do). Each row holds:

* ``id``: ``<combination id>/<sample index>``, the combination id being
  ``<vars file name>#<row index>`` (``template#0`` without ``--vars``);
* ``combination_id``, ``sample_index``, ``prompt``: kept in the output;
* ``seed``: the sample's seed, ``columns.row_seed(--seed, id)`` (the seed a
  ``generate`` row of that id gets), set as the row's own seed: the output
  records it, and it reproduces the sample;
* one column per variable, kept in the output.

The plan records the vars file and the template file by size and SHA-256
(``JobPlan.sources``): a ``--resume`` refuses a changed one.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import columns, output
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import planner, staging, synth_template, synth_vars

COMBINATION_COLUMN, SAMPLE_COLUMN, SEED_COLUMN = "combination_id", "sample_index", "seed"
STAGED_NAME = "00000-synthesize.parquet"
NO_VARS_KEY = "template"
"""The file key of combination ids when no ``--vars`` is given."""

COMBINATIONS_PER_GROUP = 4096
"""Combinations rendered and written as one row group at a time (memory stays flat)."""

RESERVED = frozenset({*output.RESERVED_COLUMNS, *(f.name for f in output.VALIDATION_FIELDS),
                      COMBINATION_COLUMN, SAMPLE_COLUMN, "prompt"})
"""Column names of synthesize's output rows that a variable cannot take."""


def job_config(config: config_lib.JobConfig, variables: list[str]) -> config_lib.JobConfig:
    """The job as the pipeline runs it on the staged file: one sample per row, its own seed."""
    io = dataclasses.replace(
        config.io,
        prompt_column="prompt",
        id_column="id",
        sampling_columns=(SEED_COLUMN,),
        sampling_params_column=None,
        keep_columns=(COMBINATION_COLUMN, SAMPLE_COLUMN, "prompt", *variables),
    )
    return dataclasses.replace(config, io=io, sampling=dataclasses.replace(config.sampling, n=1))


def stage(config: config_lib.JobConfig, template: synth_template.Template,
          variables: synth_vars.Variables | None, n: int, say: Callable[[str], None]
          ) -> tuple[config_lib.JobConfig, planner.JobPlan, staging.Staged]:
    """Renders every prompt, writes the staged file and plans the job over it.

    Args:
      config: The job (its ``io.output``, ``io.shard_rows`` and ``sampling.seed`` count).
      template: The prompt template.
      variables: The combinations (None: one, without variables).
      n: Samples per combination.
      say: Where the planner's notes go.

    Returns:
      The job as it runs, its plan, and the staged file (local until uploaded).

    Raises:
      JobInputError: A variable takes an output column's name, or a prompt
        cannot be rendered (both named).
    """
    names = variables.table.column_names if variables is not None else []
    taken = sorted(set(names) & RESERVED)
    if taken:
        raise config_lib.JobInputError(
            f"--vars {variables.url}: variable(s) {taken} take the name of output columns "
            f"({', '.join(sorted(RESERVED))}); rename them")
    config = job_config(config, names)
    if variables is not None:
        _note_sampling_lookalikes(variables.url, names, say)
    scratch = tempfile.mkdtemp(prefix="griffin-batch-synthesize-")
    try:
        local = f"{scratch}/{STAGED_NAME}"
        _write(local, template, variables, n, config.sampling.seed)
        staged_url = f"{staging.staged_dir(config.io.output)}/{STAGED_NAME}"
        plan = planner.plan(dataclasses.replace(config.io, inputs=(local,)), config.sampling,
                            say, lookalike_note=False)  # _note_sampling_lookalikes says it
        combos = len(variables.rows) if variables is not None else 1
        sources = []
        if variables is not None:
            sources.append(planner.SourceFile(url=variables.url, staged=staged_url,
                                              size=variables.size, sha256=variables.sha256,
                                              lines=combos))
        if template.is_file:
            sources.append(planner.SourceFile(url=template.source, staged=staged_url,
                                              size=template.size, sha256=template.sha256,
                                              lines=len(template.text.splitlines())))
        plan = staging.relocate(plan, {local: staged_url}, tuple(sources), ())
        return config, plan, staging.Staged(plan=plan, local={staged_url: local},
                                                   _scratch=scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _note_sampling_lookalikes(url: str, names: list[str], say: Callable[[str], None]) -> None:
    """Says that variables named like sampling fields (``n``, ``temperature``) are data only."""
    lookalikes = [name for name in names if name in columns.SAMPLING_FIELDS]
    if lookalikes:
        say(f"note: --vars {url}: variable(s) {lookalikes} are only template variables and do "
            "not change sampling; the sampling options (--n, --temperature, ...) set it for "
            "every prompt")


def staged_schema(variables: pa.Schema | None) -> pa.Schema:
    """The staged file's schema."""
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field(COMBINATION_COLUMN, pa.string(), nullable=False),
        pa.field(SAMPLE_COLUMN, pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field(SEED_COLUMN, pa.uint64(), nullable=False),
        *(variables or ()),
    ])


def _write(path: str, template: synth_template.Template,
           variables: synth_vars.Variables | None, n: int, job_seed: int) -> int:
    """Writes every (combination, sample) row to local ``path``; returns the rows written."""
    compiled = template.compile()
    key = planner.file_keys([variables.url])[0] if variables is not None else NO_VARS_KEY
    rows = variables.rows if variables is not None else [{}]
    schema = staged_schema(variables.table.schema if variables is not None else None)
    written = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, len(rows), COMBINATIONS_PER_GROUP):
            chunk = rows[start:start + COMBINATIONS_PER_GROUP]
            combo_ids = [f"{key}#{start + i}" for i in range(len(chunk))]
            prompts = [template.render(compiled, row, f"combination {cid} (row {start + i} "
                                       f"of --vars)" if variables is not None else "the prompt")
                       for i, (cid, row) in enumerate(zip(combo_ids, chunk, strict=True))]
            which = [i for i in range(len(chunk)) for _ in range(n)]
            samples = [s for _ in chunk for s in range(n)]
            ids = [f"{combo_ids[i]}/{s}" for i, s in zip(which, samples, strict=True)]
            data = {
                "id": ids,
                COMBINATION_COLUMN: [combo_ids[i] for i in which],
                SAMPLE_COLUMN: samples,
                "prompt": [prompts[i] for i in which],
                SEED_COLUMN: [columns.row_seed(job_seed, rid) for rid in ids],
            }
            table = pa.table([pa.array(data[f.name], f.type) for f in schema
                              if f.name in data], schema=pa.schema(list(schema)[:len(data)]))
            if variables is not None and variables.table.num_columns:
                taken = variables.table.slice(start, len(chunk)).take(pa.array(which, pa.int64()))
                table = pa.Table.from_arrays([*table.columns, *taken.columns], schema=schema)
            writer.write_table(table)
            written += table.num_rows
    return written
