"""Inputs a job converts before it runs: staged locally, put into the output once it is checked.

A job that makes its own Parquet inputs (``--input-format openai-batch``, ``synthesize``,
``summarize``) writes them to a local scratch directory at plan time, plans over them,
names each by its place in the output (``<output>/_manifest/inputs/``) and records
where the rows came from (``JobPlan.sources``). ``Staged.upload`` puts them in place
only once ``OutputDir.prepare`` has checked the output and taken its lease.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import shutil

import fsspec

from griffin_batch.actors import output
from griffin_batch.jobs import manifest, planner

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Staged:
    """A job's converted inputs, waiting in a local directory until the output is ready.

    Attributes:
      plan: The job's plan, naming the staged files at their place in the output.
      local: Local path of each staged file by its URL in the output.
    """

    plan: planner.JobPlan
    local: dict[str, str]
    _scratch: str

    def upload(self, out: manifest.OutputDir) -> None:
        """Puts each staged file in place, keeping one already there with the same bytes (a resume)."""
        for url, path in self.local.items():
            fs, target = fsspec.core.url_to_fs(url)
            with open(path, "rb") as f:
                wanted = hashlib.file_digest(f, "sha256").hexdigest()
            fs.invalidate_cache(target)
            if fs.exists(target) and output.file_digest(fs, target) == wanted:
                continue
            if output.has_atomic_rename(fs):
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
            # Readers come only after this returns: a plain put is enough.
            fs.put_file(path, target)
        log.info("staged %d input(s) under %s/%s", len(self.local), out.url,
                 manifest.STAGED_INPUTS_DIR)

    def cleanup(self) -> None:
        """Removes the local scratch copies."""
        shutil.rmtree(self._scratch, ignore_errors=True)


def staged_dir(output_url: str) -> str:
    """Where staged inputs go in the output (``manifest.STAGED_INPUTS_DIR``), as a URL."""
    fs, path = fsspec.core.url_to_fs(output_url)
    return output.url_of(fs, f"{path.rstrip('/')}/{manifest.STAGED_INPUTS_DIR}")


def relocate(plan: planner.JobPlan, where: dict[str, str],
              sources: tuple[planner.SourceFile, ...],
              unreadable: tuple[tuple[str, str], ...]) -> planner.JobPlan:
    """``plan`` with each local staged file named by its URL in the output (``where``)."""
    return dataclasses.replace(
        plan,
        files=tuple(dataclasses.replace(f, url=where[f.url]) for f in plan.files),
        shards=tuple(dataclasses.replace(s, path=where[s.path]) for s in plan.shards),
        unreadable=unreadable + plan.unreadable,
        sources=sources,
    )
