"""The output directory's state: the plan, each committed shard, the summary, ``_SUCCESS``.

Layout::

    <output>/part-<shard id>.parquet    one per committed shard
    <output>/_manifest/plan.json        the plan and the options that decide outputs
    <output>/_manifest/commits/<id>.json one small record per committed shard
    <output>/summary.json, _SUCCESS     written at the end

A commit record is written only after its shard's file is in place, each as
one object (object stores cannot append), so a crash at any point leaves a
directory that ``--resume`` can read: shards with a record are done, every
other shard is redone and its stray files removed.
"""

from __future__ import annotations

import datetime
import json
import logging
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec

from griffin_batch.actors import output, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import planner

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
PLAN_FILE = f"{MANIFEST_DIR}/plan.json"
COMMITS_DIR = f"{MANIFEST_DIR}/commits"
SUMMARY_FILE = "summary.json"
SUCCESS_FILE = "_SUCCESS"
MANIFEST_VERSION = 1


class OutputDir:
    """A job's output directory on any fsspec file system.

    Args:
      url: Directory URL.

    Raises:
      JobInputError: The URL names no usable file system.
    """

    def __init__(self, url: str):
        try:
            self.fs, path = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as e:
            raise config_lib.JobInputError(f"--output {url}: {e}") from None
        self.path = path.rstrip("/") or path
        self.url = output.url_of(self.fs, self.path)
        self.process_local = output.is_process_local(self.fs)

    def _join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def entries(self) -> list[str]:
        """Names directly inside the directory (empty when it does not exist)."""
        self.fs.invalidate_cache()
        try:
            return sorted(
                posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)
            )
        except FileNotFoundError:
            return []

    def prepare(
        self,
        plan: planner.JobPlan,
        fingerprint: Mapping[str, Any],
        *,
        resume: bool,
        overwrite: bool,
    ) -> dict[str, shards.ShardResult]:
        """Readies the directory for a run; returns the shards already committed.

        A fresh job needs an empty or missing directory (or ``overwrite``); a
        resumed one needs the same plan and output-deciding options.

        Raises:
          JobInputError: The directory is not empty, belongs to a different job,
            or cannot be written (the message says which and what to pass).
        """
        try:
            existing = self.entries()
            if existing and overwrite:
                self.fs.rm(self.path, recursive=True)
                existing = []
            if existing and not resume:
                raise config_lib.JobInputError(
                    f"output {self.url} is not empty (it holds {', '.join(existing[:3])}"
                    f"{', ...' if len(existing) > 3 else ''}); pass --resume to continue the job "
                    "recorded there or --overwrite to replace it"
                )
            if existing:
                return self._resume(plan, fingerprint, existing)
            self._write_plan(plan, fingerprint)
            return {}
        except OSError as e:
            raise config_lib.JobInputError(f"output {self.url} is not writable: {e}") from None

    def _write_plan(self, plan: planner.JobPlan, fingerprint: Mapping[str, Any]) -> None:
        if output.has_atomic_rename(self.fs):
            self.fs.makedirs(self.path, exist_ok=True)
        record = {
            "version": MANIFEST_VERSION,
            "created": _now(),
            "options": dict(fingerprint),
            "plan": plan.to_dict(),
        }
        self._put(PLAN_FILE, record)

    def _resume(
        self, plan: planner.JobPlan, fingerprint: Mapping[str, Any], existing: list[str]
    ) -> dict[str, shards.ShardResult]:
        try:
            saved = json.loads(self.fs.cat_file(self._join(PLAN_FILE)))
        except FileNotFoundError:
            raise config_lib.JobInputError(
                f"output {self.url} holds {', '.join(existing[:3])} but no job manifest "
                f"({PLAN_FILE}); it was not written by this job, pass --overwrite to replace it"
            ) from None
        _check_same_job(self.url, saved, plan, fingerprint)
        committed = self.committed()
        present = set(self.entries())
        for shard_id in [s for s in committed if output.part_name(s) not in present]:
            log.warning("shard %s has a commit record but no file; redoing it", shard_id)
            del committed[shard_id]
        keep = {output.part_name(s) for s in committed}
        for name in present:
            stray = (name.startswith("part-") and name not in keep) or name in (
                output.TEMP_DIR,
                SUCCESS_FILE,
                SUMMARY_FILE,
            )
            if stray:  # partial work of the interrupted run
                self.fs.rm(self._join(name), recursive=True)
        return committed

    def committed(self) -> dict[str, shards.ShardResult]:
        """Commit records by shard id."""
        self.fs.invalidate_cache()
        try:
            paths = self.fs.ls(self._join(COMMITS_DIR), detail=False)
        except FileNotFoundError:
            return {}
        paths = [p for p in paths if p.endswith(".json")]
        blobs = self.fs.cat(paths) if paths else {}
        records = [shards.ShardResult.from_record(json.loads(b)) for b in blobs.values()]
        return {r.shard_id: r for r in records}

    def commit(self, result: shards.ShardResult) -> None:
        """Records a finished shard, first publishing its file when the worker returned it."""
        if result.payload is not None:
            output.publish(
                self.fs,
                self.path,
                output.part_name(result.shard_id),
                result.payload,
                temp_dir=self._join(output.TEMP_DIR),
            )
        self._put(f"{COMMITS_DIR}/{result.shard_id}.json", result.record())

    def write_summary(self, summary: Mapping[str, Any], *, success: bool) -> None:
        """Writes ``summary.json`` and, when every shard is committed, ``_SUCCESS``."""
        self._put(SUMMARY_FILE, summary)
        if success:
            self.fs.pipe_file(self._join(SUCCESS_FILE), b"")
        if output.has_atomic_rename(self.fs) and self.fs.exists(self._join(output.TEMP_DIR)):
            self.fs.rm(self._join(output.TEMP_DIR), recursive=True)

    def _put(self, name: str, record: Mapping[str, Any]) -> None:
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        directory, base = posixpath.split(self._join(name))
        if output.has_atomic_rename(self.fs):
            self.fs.makedirs(directory, exist_ok=True)
        output.publish(self.fs, directory, base, data, temp_dir=self._join(output.TEMP_DIR))


def _check_same_job(
    url: str, saved: Mapping[str, Any], plan: planner.JobPlan, fingerprint: Mapping[str, Any]
) -> None:
    old = saved.get("options", {})
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if changed:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {fingerprint.get(k)!r}" for k in changed)
        raise config_lib.JobInputError(
            f"cannot resume {url}: options that decide the output changed ({detail}); "
            "rerun with the original options or pass --overwrite"
        )
    if saved.get("plan") != plan.to_dict():
        old_files = {f["url"]: f["num_rows"] for f in saved.get("plan", {}).get("files", [])}
        new_files = {f.url: f.num_rows for f in plan.files}
        diff = sorted(set(old_files.items()) ^ set(new_files.items()))
        raise config_lib.JobInputError(
            f"cannot resume {url}: the inputs changed since the job was planned "
            f"(files/rows that differ: {diff[:5] or 'row groups'}); pass --overwrite to start over"
        )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
