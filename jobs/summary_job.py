"""``griffin-batch summarize``: its options, and its stages run one after another on the one driver.

``--mode single`` is one job: each document whole in one request (the engine
prefills it in chunks, so its memory does not grow with the document).

``--mode map-reduce`` is one job in stages, each an ordinary run of the driver
with its guarantees (exactly once, progress checkpoints, ``--resume``):

1. ``<output>/_stages/level-1/``: one request per section of every document
   over ``--section-tokens`` (``summary_sections``);
2. ``<output>/_stages/level-<k>/`` (only when needed): a document whose
   summaries together still exceed the budget gets them summarized in groups;
3. ``<output>``: one request per document, combining its last summaries (or
   summarizing it whole when it needed no split).

A stage starts only once the one before has committed every shard; a lost
worker costs a retry inside its stage, a lost driver a ``--resume``, which
finds each finished stage finished (nothing runs again) and goes on from the
first one that is not. ``griffin-batch status OUTPUT`` and ``cancel OUTPUT``
follow whichever stage runs (``jobs.stages``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from griffin_batch.cluster import connect
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import driver, manifest, stages, summary_inputs, summary_staging

SINGLE, MAP_REDUCE = "single", "map-reduce"
MODES = (SINGLE, MAP_REDUCE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SummarizeConfig:
    """What ``summarize`` adds to a job's options.

    Attributes:
      text_column: ``--text-column``: the Parquet column of documents; None: the
        inputs are text files (``.txt``, ``.md``), one document each.
      id_column: ``--id-column``: the Parquet id column (None: ``id`` where present).
      instruction: ``--instruction``: what the model is asked.
      mode: ``--mode``: ``single`` or ``map-reduce``.
      section_tokens: ``--section-tokens``: most tokens per section (map-reduce).
      keep_sections: ``--keep-sections``: the output keeps the section summaries.
      chat: ``--chat``: the model is instruction-tuned: prompts are one user turn in
        its chat format; otherwise the plain layout ending in ``Summary:``.
    """

    text_column: str | None = None
    id_column: str | None = None
    instruction: str = summary_staging.DEFAULT_INSTRUCTION
    mode: str = SINGLE
    section_tokens: int = 2048
    keep_sections: bool = False
    chat: bool = False

    def validate(self, config: config_lib.JobConfig) -> None:
        """Raises ``JobInputError`` naming the first inconsistent option."""
        if self.mode not in MODES:
            raise config_lib.JobInputError(f"--mode must be one of {', '.join(MODES)}, "
                                           f"got {self.mode!r}")
        if not self.instruction.strip():
            raise config_lib.JobInputError("--instruction must not be empty")
        if self.text_column is not None and not self.text_column:
            raise config_lib.JobInputError("--text-column must not be empty")
        if self.id_column is not None and self.text_column is None:
            raise config_lib.JobInputError("--id-column needs --text-column (a text file's id "
                                           "is its path)")
        if self.keep_sections and self.mode != MAP_REDUCE:
            raise config_lib.JobInputError("--keep-sections needs --mode map-reduce")
        limit = config.model.engine.max_prompt_tokens
        if self.mode == MAP_REDUCE and not 0 < self.section_tokens < limit:
            raise config_lib.JobInputError(
                f"--section-tokens must be in (0, --max-prompt-tokens {limit}), "
                f"got {self.section_tokens}")
        if config.sampling.n != 1:
            raise config_lib.JobInputError("summarize writes one summary per document: --n "
                                           f"must be 1, got {config.sampling.n}")

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide the summaries (a ``--resume`` must keep them)."""
        return {"mode": self.mode, "instruction": self.instruction, "chat": self.chat,
                "text_column": self.text_column, "id_column": self.id_column,
                "section_tokens": self.section_tokens if self.mode == MAP_REDUCE else None,
                "keep_sections": self.keep_sections}


def run(config: config_lib.JobConfig, summ: SummarizeConfig, *,
        say: driver.Say = print,
        on_cluster_lost: Callable[[driver.JobResult], None] | None = None) -> driver.JobResult:
    """Runs a summarize job: one stage, or every map-reduce stage in turn.

    Returns:
      The last stage's result: the final stage's, or that of the first stage that
      did not finish (its ``output`` is the stage's directory).

    Raises:
      JobInputError: Bad input, found before any worker starts (the first stage's).
      ConnectionError: No Ray cluster answers.
    """
    config.validate()
    summ.validate(config)
    _refuse_a_fresh_run_into_a_full_output(config)
    tokenizer = _tokenizer(config.model)
    prompts = summary_staging.Prompts(summ.instruction, summ.chat)
    sources = summary_inputs.sources(config.io.inputs, summ.text_column, summ.id_column)
    options = summ.fingerprint()
    # Prompts are rendered when staged; workers take them as they are.
    base = dataclasses.replace(config, model=dataclasses.replace(config.model, chat=False))
    runner = _Runner(base, say, on_cluster_lost)
    with connect.held_open():  # one cluster for every stage, not one started per stage
        return _run_stages(config, summ, runner, sources, prompts, tokenizer, options, say)


def _run_stages(config: config_lib.JobConfig, summ: SummarizeConfig, runner: _Runner,
                sources: list[summary_inputs.Source], prompts: summary_staging.Prompts,
                tokenizer: Any, options: dict[str, Any],
                say: driver.Say) -> driver.JobResult:
    """The job's stages in turn; the last stage's result (see ``run``)."""
    if summ.mode == SINGLE:
        return runner.run(config.io.output,
                          summary_staging.DocumentsStage(sources, prompts, tokenizer, options))
    first = summary_staging.SectionsStage(sources, prompts, tokenizer, summ.section_tokens,
                                          options)
    levels = [stages.stage_url(config.io.output, first.name)]
    result = runner.run(levels[0], first)
    while result.succeeded:
        reduce = summary_staging.ReduceStage(len(levels) + 1, levels[-1], prompts, tokenizer,
                                             summ.section_tokens, options)
        if not reduce.count():
            break
        levels.append(stages.stage_url(config.io.output, reduce.name))
        result = runner.run(levels[-1], reduce)
    if not result.succeeded:
        say(f"stage {result.output} did not finish; the final summaries wait for it: rerun "
            "with --resume to go on from there")
        return result
    final = summary_staging.FinalStage(first, levels, prompts, summ.keep_sections, options)
    return runner.run(config.io.output, final)


@dataclasses.dataclass
class _Runner:
    """Runs one stage into its own directory on the driver."""

    config: config_lib.JobConfig
    say: driver.Say
    on_cluster_lost: Callable[[driver.JobResult], None] | None

    def run(self, url: str, stage: summary_staging._Stage) -> driver.JobResult:
        self.say(f"summarize: stage {stage.name} -> {url}")
        config = dataclasses.replace(self.config,
                                     io=dataclasses.replace(self.config.io, output=url))
        return driver.run(config, say=self.say, on_cluster_lost=self.on_cluster_lost,
                          variant=stage)


def _refuse_a_fresh_run_into_a_full_output(config: config_lib.JobConfig) -> None:
    """A fresh run needs an empty output, its stages included (checked before any stage runs)."""
    if config.resume.resume or config.resume.overwrite:
        return
    held = manifest.OutputDir(config.io.output).entries()
    if held:
        raise config_lib.JobInputError(
            f"output {config.io.output} is not empty (it holds {', '.join(held[:3])}); pass "
            "--resume to continue the job recorded there or --overwrite to replace it")


def _tokenizer(m: config_lib.ModelConfig):
    """The job's tokenizer, on the driver: it counts documents' tokens and splits them."""
    from griffin_batch.model import tokenizer

    if m.tokenizer is None:
        from griffin_batch.model import demo

        return tokenizer.load_tokenizer(demo.demo_tokenizer_path())
    try:
        return tokenizer.load_tokenizer(m.tokenizer)
    except (OSError, ValueError) as e:
        raise config_lib.JobInputError(f"--tokenizer {m.tokenizer}: {e}") from None
