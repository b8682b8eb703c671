"""The output directory's state: the lease, the plan, each committed shard, the summary.

Layout::

    <output>/part-<shard id>.parquet     one per committed shard, written by the driver only
    <output>/_attempts/                  workers' attempt files, not yet promoted
    <output>/_progress/                  row-level progress of shards still running
    <output>/_temporary/                 small files staged before their rename (local disks)
    <output>/_manifest/plan.json         the plan and the options that decide outputs
    <output>/_manifest/commits/<id>.json one small record per committed shard
    <output>/_manifest/lease.json        which driver holds the directory, and until when
    <output>/_manifest/cancel.json       a request to stop (``griffin-batch cancel``)
    <output>/_manifest/inputs/           OpenAI batch inputs converted to Parquet (``--input-format``)
    <output>/output.jsonl, errors.jsonl  OpenAI batch output records (``--output-format``)
    <output>/_deduplicated/              ``synthesize``'s rows left by ``--dedup``, and what it removed
    <output>/_stages/<stage>/            ``summarize``'s earlier stages, each a job directory of its own
    <output>/_summary.json               the job's state, rewritten while it runs
    <output>/_SUCCESS                    written at the end when every shard committed

The output is never the root of a bucket or of a file system, and never holds
an input file (refused on every run, before the directory is touched).
``--overwrite`` deletes only what an earlier run wrote: the names above, with
``part-`` files only for the shards of the plan saved in ``_manifest/plan.json``.
A directory without that plan, or with any other entry, is refused, naming
what is foreign, before anything is deleted.

Exactly once, verified:

* **One commit per shard, by the driver.** Workers write attempt files only
  (``griffin_batch.actors.output``). ``commit`` promotes the reported attempt
  file to ``part-<id>.parquet`` (a rename, or a server-side copy and a delete),
  reads the final file's size and footer row count, and writes the commit
  record: size, SHA-256 (the worker's, over the bytes it wrote; a rename or a
  copy keeps them), row count, and the attempt file it came from. A result for
  a shard already committed (a late writer, a repeated result) is ignored with
  a warning and its attempt file deleted: nothing replaces a committed part.
  When a retried shard commits, files its earlier attempts left are deleted;
  ``write_summary`` removes whatever is left of ``_attempts/``.
* **Crash-safe order.** A record is written only after its file is in place,
  each as one object (object stores cannot append), so a crash at any point
  leaves a directory that ``--resume`` can read.
* **Resume re-verifies.** Every committed part is checked against its record
  (size, footer rows, SHA-256 of the whole file); one that is missing or
  differs loses its file and record, with a warning naming what differed, and
  is redone like every shard without a record. The plan's ``part-`` files
  without a record, ``_attempts/``, ``_temporary/``, ``_summary.json`` and
  ``_SUCCESS`` are removed; ``_manifest/`` and ``_progress/`` are kept, and so
  is anything this tool does not write. Version-1 records
  (written before attempt files: no size, no checksum) are verified by what
  they hold, that the file exists and its footer has the recorded row count,
  so a job started by the older code resumes without redoing its work.
* **One driver at a time.** ``prepare`` takes the lease before it deletes or
  writes anything and refuses while another driver's lease has not expired.
  The running driver renews it (``renew``, at most every ``LEASE_RENEW_S``,
  and before every commit once that long has passed); a driver that finds the
  lease taken by another stops (``LeaseLost``) instead of writing beside it.
  A driver that dies stops renewing: its lease expires ``LEASE_TTL_S`` later,
  or at once for a driver on the same host whose process is gone (host and pid,
  as git's ``gc.pid``; machines or containers that share a hostname but not a
  process table would confuse it), so a crashed job resumes without waiting.
  fsspec offers no compare-and-swap on object stores: reading the lease back
  after writing it narrows, but cannot close, the window in which two drivers
  starting in the same instant both take it. Expiry times are wall-clock
  seconds, compared across hosts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from griffin_batch.actors import output, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import lifecycle, planner

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
PLAN_FILE = f"{MANIFEST_DIR}/plan.json"
COMMITS_DIR = f"{MANIFEST_DIR}/commits"
LEASE_FILE = f"{MANIFEST_DIR}/lease.json"
CANCEL_FILE = f"{MANIFEST_DIR}/cancel.json"
"""Written by ``griffin-batch cancel``; the running driver stops its workers when it sees it."""
STAGED_INPUTS_DIR = f"{MANIFEST_DIR}/inputs"
"""OpenAI batch input files converted to Parquet (``jobs.openai_staging``); workers read these."""
BATCH_OUTPUT_FILE = "output.jsonl"
BATCH_ERRORS_FILE = "errors.jsonl"
"""OpenAI batch output records (``jobs.openai_results``), written once every shard is committed."""
DEDUP_DIR = "_deduplicated"
"""``griffin-batch synthesize``'s deduplicated rows (``jobs.synth_dedup``), written once every
shard is committed; ``_``-prefixed so that reading the output as a Parquet dataset still
gives each committed row once."""
STAGES_DIR = "_stages"
"""Earlier stages of a multi-stage job (``summarize --mode map-reduce``), each an output
directory with its own manifest and lease; ``prepare`` leaves it to them."""
SUMMARY_FILE = "_summary.json"
"""The job's state, rewritten while it runs (``jobs.lifecycle``); ``_``-prefixed like every
other file beside the parts, so that ``pandas.read_parquet(output)`` and
``pyarrow.dataset`` skip it and read the output directory as the table of its rows."""
LEGACY_SUMMARY_FILE = "summary.json"
"""The summary's name up to version 0.1.0, which made the output directory unreadable as a
Parquet dataset. Read where there is no ``SUMMARY_FILE``; removed on resume like any stray."""
SUCCESS_FILE = "_SUCCESS"
MANIFEST_VERSION = 2
"""2: commit records carry the final file's size and SHA-256 and its attempt file."""

LEASE_TTL_S = 60.0
"""A driver's lease on its output lasts this long after its last renewal; then
another driver may take the directory over."""

LEASE_RENEW_S = 15.0
"""The driver renews its lease at most this often: well inside the TTL, so a slow
store or a few failed renewals do not lose it."""

VERIFY_THREADS = 8
"""Committed parts re-verified at once on ``--resume`` (object-store reads are latency-bound)."""

# Left by an interrupted run, removed on resume (with ``part-`` files without a record).
_STRAYS = (output.TEMP_DIR, output.ATTEMPTS_DIR, SUCCESS_FILE, SUMMARY_FILE, LEGACY_SUMMARY_FILE,
           BATCH_OUTPUT_FILE, BATCH_ERRORS_FILE, DEDUP_DIR)

# What a run writes directly in its output besides its parts; ``--overwrite`` may delete these.
_RUN_NAMES = frozenset({*_STRAYS, shards.PROGRESS_DIR, MANIFEST_DIR})
_MANIFEST_NAMES = frozenset(
    posixpath.basename(f) for f in (PLAN_FILE, COMMITS_DIR, LEASE_FILE, CANCEL_FILE,
                                    STAGED_INPUTS_DIR))

# Local file systems (and memory://) have one root; on every other protocol the
# first path component is a bucket, a container or a host.
_SINGLE_ROOT_PROTOCOLS = frozenset({None, "file", "local", "memory"})

_NAMES_SHOWN = 5


def read_summary(fs: fsspec.AbstractFileSystem, directory: str) -> dict[str, Any]:
    """The job summary in output ``directory`` (``SUMMARY_FILE``, else ``LEGACY_SUMMARY_FILE``).

    Raises FileNotFoundError when it holds neither, ValueError when the file is not a JSON
    object, and OSError when the store cannot be read.
    """
    directory = directory.rstrip("/")
    for name in (SUMMARY_FILE, LEGACY_SUMMARY_FILE):
        try:
            data = fs.cat_file(f"{directory}/{name}")
        except FileNotFoundError:
            continue
        summary = json.loads(data)
        if not isinstance(summary, dict):
            raise ValueError(f"{directory}/{name} holds {type(summary).__name__}, not a JSON object")
        return summary
    raise FileNotFoundError(f"{directory}/{SUMMARY_FILE}")


class LeaseLost(config_lib.JobInputError):
    """Another driver holds this driver's output directory now; this one must stop writing."""


class CommitError(RuntimeError):
    """A promoted part does not match what its worker reported (a storage fault)."""


class OutputDir:
    """A job's output directory on any fsspec file system.

    Args:
      url: Directory URL.
      lease_ttl_s: How long this driver's lease lasts after each renewal.
      lease_renew_s: Least time between two renewals.

    Attributes:
      fs: The file system.
      path: The directory's path on ``fs`` (no protocol).
      url: A URL of the directory any process can open.
      process_local: Only this process can see the directory (``memory://``).
      holder: This driver's lease holder id.

    Raises:
      JobInputError: The URL names no usable file system, or the root of a
        bucket or file system.
    """

    def __init__(
        self, url: str, *, lease_ttl_s: float = LEASE_TTL_S, lease_renew_s: float = LEASE_RENEW_S
    ):
        if _is_root(url):  # decided from the URL alone: no network, nothing touched
            raise config_lib.JobInputError(
                f"--output {url} is the root of a bucket or file system; refused so that no run "
                "(nor --overwrite) can fill or empty it: name a directory of the job's own, "
                f"e.g. {url.rstrip('/')}/<job name>"
            )
        try:
            self.fs, path = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as e:
            raise config_lib.JobInputError(f"--output {url}: {e}") from None
        self.path = path.rstrip("/") or path
        self.url = output.url_of(self.fs, self.path)
        self.process_local = output.is_process_local(self.fs)
        self.holder = uuid.uuid4().hex
        self._lease_ttl_s = lease_ttl_s
        self._lease_renew_s = lease_renew_s
        self._lease_expires: float | None = None  # wall clock; None while not held
        self._lease_renewed = 0.0  # monotonic
        self._committed: set[str] = set()

    def _join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def entries(self) -> list[str]:
        """Names directly inside the directory (empty when it does not exist)."""
        return sorted(self._listing())

    def _listing(self) -> dict[str, Mapping[str, Any]]:
        """Entries directly inside the directory by name, with fsspec's details (size, type)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(d["name"].rstrip("/")): d for d in found}

    def prepare(
        self,
        plan: planner.JobPlan,
        fingerprint: Mapping[str, Any],
        *,
        resume: bool,
        overwrite: bool,
    ) -> dict[str, shards.ShardResult]:
        """Takes the lease and readies the directory for a run; returns the shards already committed.

        A fresh job needs an empty or missing directory (or ``overwrite``); a
        resumed one needs the same plan and output-deciding options. Every check
        runs before anything is written or deleted. The lease is held from here
        until ``release``.

        Raises:
          JobInputError: Another driver holds the directory; or it holds an input
            file, is not empty, belongs to a different job, holds files this tool
            did not write (``overwrite``), or cannot be written (the message says
            which and what to pass).
        """
        try:
            self._refuse_inputs_inside(plan)  # first: an input file itself is named as such
            if self.fs.isfile(self.path):  # else the lease's write fails with "Not a directory"
                raise config_lib.JobInputError(
                    f"output {self.url} is a file: --output names a directory (of part files)")
            # Earlier stages ran in _stages/ just before this one: their own directories.
            existing = [n for n in self.entries() if n != STAGES_DIR]
            if existing:
                self._refuse_if_leased()
            if existing and not resume and not overwrite:
                raise config_lib.JobInputError(
                    f"output {self.url} is not empty (it holds {planner.first_few(existing, 3)}); pass "
                    "--resume to continue the job recorded there or --overwrite to replace it"
                )
            resuming = bool(existing) and not overwrite
            if resuming:  # read-only checks first: a refusal leaves no trace
                _check_same_job(self.url, self._saved_plan(existing), plan, fingerprint)
            doomed = self._previous_run(existing) if existing and overwrite else []
            self._take_lease()
            try:
                for name in doomed:
                    self._remove(self._join(name))
                self._remove(self._join(CANCEL_FILE))  # a cancelled run's request is done
                committed = self._resume(plan) if resuming else {}
                if not resuming:
                    self._write_plan(plan, fingerprint)
            except BaseException:
                self.release()
                raise
            self._committed = set(committed)
            return committed
        except OSError as e:
            raise config_lib.JobInputError(f"output {self.url} is not writable: {e}") from None

    def _refuse_inputs_inside(self, plan: planner.JobPlan) -> None:
        """Refuses an output that holds an input file, which ``--overwrite`` would delete.

        Staged inputs (``STAGED_INPUTS_DIR``, converted from ``plan.sources``) are
        this job's own; the files they came from are checked instead.
        """
        out = _normal_path(self.fs, self.path)
        staged = f"{out.rstrip('/')}/{STAGED_INPUTS_DIR}/"
        for f in [*plan.files, *plan.sources]:
            path = _path_on(self.fs, f.url)
            if path is not None and path.startswith(staged):
                continue
            if path is not None and (path == out or path.startswith(out.rstrip("/") + "/")):
                raise config_lib.JobInputError(
                    f"output {self.url} holds the input file {f.url}; a job never writes where it "
                    "reads: choose an --output outside the inputs' directories"
                )

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

    def _previous_run(self, existing: list[str]) -> list[str]:
        """What ``--overwrite`` deletes: the entries an earlier run wrote, all but the lease.

        Raises:
          JobInputError: The directory holds anything else, or no readable plan
            to tell the earlier run's part files by. Nothing is deleted.
        """
        in_manifest = self._names_in(MANIFEST_DIR) if MANIFEST_DIR in existing else []
        plan_name = posixpath.basename(PLAN_FILE)
        lease_name = posixpath.basename(LEASE_FILE)
        if plan_name in in_manifest:
            parts = _part_names(self._saved_plan(existing))
            ours, ours_in_manifest = _RUN_NAMES | parts, _MANIFEST_NAMES
        else:  # at most a start interrupted before its plan was written
            ours, ours_in_manifest = {MANIFEST_DIR, output.TEMP_DIR}, {lease_name}
        foreign = [n for n in existing if n not in ours]
        foreign += [f"{MANIFEST_DIR}/{n}" for n in in_manifest if n not in ours_in_manifest]
        if foreign:
            why = "" if plan_name in in_manifest else f", and no job manifest ({PLAN_FILE})"
            raise config_lib.JobInputError(
                f"--overwrite refused: output {self.url} holds files this tool did not write: "
                f"{planner.first_few(foreign, _NAMES_SHOWN)}{why}; nothing was deleted. Remove them "
                "yourself or choose another --output"
            )
        doomed = [n for n in existing if n != MANIFEST_DIR]
        return doomed + [f"{MANIFEST_DIR}/{n}" for n in in_manifest if n != lease_name]

    def plan_record(self) -> dict[str, Any]:
        """The saved ``plan.json`` record (version, creation time, options, plan).

        Raises:
          JobInputError: There is none, or it is unreadable.
        """
        return self._saved_plan([PLAN_FILE])

    def _names_in(self, name: str) -> list[str]:
        """Names directly inside ``name`` (its own name when it is a file)."""
        paths = self.fs.ls(self._join(name), detail=False)
        return sorted(posixpath.basename(p.rstrip("/")) for p in paths)

    def _saved_plan(self, existing: list[str]) -> dict[str, Any]:
        try:
            saved = json.loads(self.fs.cat_file(self._join(PLAN_FILE)))
            _part_names(saved)
        except FileNotFoundError:
            raise config_lib.JobInputError(
                f"output {self.url} holds {planner.first_few(existing, 3)} but no job manifest "
                f"({PLAN_FILE}); this tool did not write it: choose another --output, "
                "or empty it yourself"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise config_lib.JobInputError(
                f"output {self.url}: its job manifest {PLAN_FILE} is unreadable ({e!r}); "
                "choose another --output, or empty it yourself"
            ) from None
        return saved

    def _resume(self, plan: planner.JobPlan) -> dict[str, shards.ShardResult]:
        """Keeps the committed parts that match their records, removes the rest of the old run's work."""
        committed = self.committed()
        listing = self._listing()
        for shard_id, problem in self._verify(committed, listing).items():
            name = output.part_name(shard_id)
            log.warning(
                "shard %s: committed part %s %s; removing it and its record, redoing the shard",
                shard_id,
                name,
                problem,
            )
            self.fs.rm_file(self._join(f"{COMMITS_DIR}/{shard_id}.json"))
            if name in listing:
                self.fs.rm(self._join(name), recursive=True)
                del listing[name]
            del committed[shard_id]
        redo = {output.part_name(s.shard_id) for s in plan.shards if s.shard_id not in committed}
        for name in listing:  # partial work of the interrupted run; _manifest, _progress stay
            if name in redo or name in _STRAYS:
                self.fs.rm(self._join(name), recursive=True)
        return committed

    def _verify(
        self, committed: Mapping[str, shards.ShardResult], listing: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, str]:
        """What differs between each committed part and its record, by shard id (matches left out)."""

        def check(record: shards.ShardResult) -> str | None:
            return self._part_problem(record, listing.get(output.part_name(record.shard_id)))

        with concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS) as pool:
            problems = dict(zip(committed, pool.map(check, committed.values()), strict=True))
        return {k: v for k, v in sorted(problems.items()) if v is not None}

    def _part_problem(
        self, record: shards.ShardResult, listed: Mapping[str, Any] | None
    ) -> str | None:
        if listed is None or listed.get("type") == "directory":
            return "is missing"
        if record.size is not None and listed["size"] != record.size:
            return f"has {listed['size']} bytes, its record {record.size}"
        path = self._join(output.part_name(record.shard_id))
        try:
            rows = output.num_rows(self.fs, path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            return f"has no readable Parquet footer ({e})"
        if rows != record.samples:
            return f"has {rows} rows, its record {record.samples}"
        if record.sha256 is not None:  # None: a version-1 record
            found = output.file_digest(self.fs, path)
            if found != record.sha256:
                return f"has SHA-256 {found[:16]}..., its record {record.sha256[:16]}..."
        return None

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

    def commit(self, result: shards.ShardResult) -> shards.ShardResult | None:
        """Promotes a finished shard's attempt file to its final name and records the commit.

        Args:
          result: A worker's report; its ``attempt_path`` names a file in this
            directory's ``_attempts/`` (or ``payload`` holds the file's bytes).

        Returns:
          The commit record; None when the shard was already committed (the
          result is ignored with a warning and its attempt file removed).

        Raises:
          LeaseLost: Another driver holds the directory now.
          CommitError: The promoted file's size or rows differ from the report.
        """
        self.renew()
        attempt = self._attempt_file(result)
        if result.shard_id in self._committed:
            log.warning(
                "shard %s is already committed; ignoring attempt %d from %s (%s)",
                result.shard_id,
                result.attempt,
                result.worker,
                posixpath.basename(attempt),
            )
            self._remove(attempt)
            return None
        if result.payload is not None:  # the worker could not reach this file system
            output.write_attempt(self.fs, self.path, posixpath.basename(attempt), result.payload)
        final = self._join(output.part_name(result.shard_id))
        output.promote(self.fs, attempt, final)
        self.fs.invalidate_cache(final)
        size, rows = self.fs.info(final)["size"], output.num_rows(self.fs, final)
        if (size, rows) != (result.size, result.samples):
            raise CommitError(
                f"shard {result.shard_id}: {final} has {size} bytes and {rows} rows after its "
                f"promotion, the worker wrote {result.size} bytes and {result.samples} rows; "
                "rerun with --resume to redo it"
            )
        record = dataclasses.replace(
            result,
            output_path=output.url_of(self.fs, final),
            attempt_path=output.url_of(self.fs, attempt),
            size=size,
            samples=rows,
            payload=None,
        )
        self._put(
            f"{COMMITS_DIR}/{result.shard_id}.json",
            {**record.record(), "version": MANIFEST_VERSION},
        )
        self._committed.add(result.shard_id)
        if result.attempt > 0:  # earlier attempts may have left files
            self._remove_attempts_of(result.shard_id)
        return record

    def _attempt_file(self, result: shards.ShardResult) -> str:
        """The result's attempt file; only its name is taken, the directory is always ours."""
        name = posixpath.basename(result.attempt_path)
        if not output.is_attempt_of(name, result.shard_id):
            raise CommitError(
                f"shard {result.shard_id}: {result.attempt_path!r} is no attempt file"
            )
        return self._join(f"{output.ATTEMPTS_DIR}/{name}")

    def _remove_attempts_of(self, shard_id: str) -> None:
        attempts = self._join(output.ATTEMPTS_DIR)
        self.fs.invalidate_cache(attempts)
        try:
            paths = self.fs.ls(attempts, detail=False)
        except FileNotFoundError:
            return
        for path in paths:
            if output.is_attempt_of(posixpath.basename(path), shard_id):
                self._remove(path)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def put_summary(self, summary: Mapping[str, Any]) -> None:
        """Rewrites ``_summary.json`` while the job runs (``jobs.lifecycle``)."""
        self._put(SUMMARY_FILE, summary)

    def cancel_requested(self) -> dict[str, Any] | None:
        """The cancel request ``griffin-batch cancel`` left, if any."""
        try:
            record = json.loads(self.fs.cat_file(self._join(CANCEL_FILE)))
        except FileNotFoundError:
            return None
        except ValueError:
            record = {}
        return record if isinstance(record, dict) else {}

    def write_summary(self, summary: Mapping[str, Any], *, success: bool) -> None:
        """Writes ``_summary.json`` and, when every shard is committed, ``_SUCCESS``.

        Also removes ``_attempts/`` (what late or failed attempts left) and ``_temporary/``.
        """
        self.renew()
        self._put(SUMMARY_FILE, summary)
        if success:
            self.fs.pipe_file(self._join(SUCCESS_FILE), b"")
        for name in (output.ATTEMPTS_DIR, output.TEMP_DIR):
            self._remove(self._join(name))

    # The lease. ------------------------------------------------------------

    def _read_lease(self) -> dict[str, Any] | None:
        try:
            data = self.fs.cat_file(self._join(LEASE_FILE))
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(data)
            lease["expires"] = float(lease["expires"])
            str(lease["holder"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the unreadable lease %s", self._join(LEASE_FILE))
            return None
        return lease

    def _in_use(self, lease: Mapping[str, Any]) -> str:
        left = lease["expires"] - time.time()
        return (
            f"output {self.url} is in use by another driver (host {lease.get('host')}, "
            f"pid {lease.get('pid')}, lease {str(lease['holder'])[:8]}), whose lease expires "
            f"in {max(left, 0):.0f} s ({_iso(lease['expires'])}) unless it renews it; wait for "
            f"that job to finish, or, if it has stopped, rerun once its lease has expired "
            f"(a driver's lease expires {LEASE_TTL_S:.0f} s after it stops)"
        )

    def _refuse_if_leased(self) -> None:
        lease = self._read_lease()
        if lease and lease["holder"] != self.holder and lease["expires"] > time.time():
            if not _stopped_here(lease):
                raise config_lib.JobInputError(self._in_use(lease))
            log.warning(
                "output %s: taking over the lease of driver pid %s on this host, which has stopped",
                self.url,
                lease.get("pid"),
            )

    def _take_lease(self) -> None:
        self._write_lease(acquired=time.time())
        back = self._read_lease()  # two drivers that wrote at once: the last write wins
        if back is None or back["holder"] != self.holder:
            self._lease_expires = None
            if back is None:
                raise config_lib.JobInputError(f"output {self.url}: the lease vanished as taken")
            raise config_lib.JobInputError(self._in_use(back))

    def _write_lease(self, acquired: float) -> None:
        now = time.time()
        record = {
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired": round(acquired, 3),
            "expires": round(now + self._lease_ttl_s, 3),
        }
        self._put(LEASE_FILE, record)
        self._lease_expires = record["expires"]
        self._lease_renewed = time.monotonic()

    def renew(self) -> None:
        """Extends this driver's lease when ``lease_renew_s`` has passed since the last time.

        Cheap to call often (the driver calls it on every scheduler tick).
        A renewal that fails on a storage error is retried on the next call
        while the lease is still valid.

        Raises:
          LeaseLost: Another driver holds the lease now, its file is gone, or
            it expired before a renewal succeeded. This driver must stop.
        """
        if self._lease_expires is None:
            return
        if time.monotonic() - self._lease_renewed < self._lease_renew_s:
            return
        try:
            lease = self._read_lease()
            if lease is not None and lease["holder"] == self.holder:
                self._write_lease(acquired=float(lease.get("acquired", time.time())))
                return
        except OSError as e:
            if time.time() < self._lease_expires:
                log.warning("could not renew the lease on %s (%s); retrying", self.url, e)
                return
            self._lease_expires = None
            raise LeaseLost(
                f"output {self.url}: this driver's lease expired before it could renew it ({e}); "
                "stopping so as not to write beside another driver; committed shards are kept, "
                "rerun with --resume"
            ) from None
        self._lease_expires = None
        who = (
            "its lease file is gone"
            if lease is None
            else f"the driver on host {lease.get('host')}, pid {lease.get('pid')}, holds it now"
        )
        raise LeaseLost(
            f"output {self.url}: this driver lost its lease ({who}); stopping so as not to "
            "write beside another driver; committed shards are kept (rerun with --resume "
            "once the other driver is done)"
        )

    def release(self) -> None:
        """Gives the lease up (at the end of a run, failed or not); never raises."""
        if self._lease_expires is None:
            return
        self._lease_expires = None
        try:
            lease = self._read_lease()
            if lease is not None and lease["holder"] == self.holder:
                self.fs.rm_file(self._join(LEASE_FILE))
        except OSError as e:
            log.warning("could not release the lease on %s (it expires by itself): %s", self.url, e)

    def _put(self, name: str, record: Mapping[str, Any]) -> None:
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        directory, base = posixpath.split(self._join(name))
        if output.has_atomic_rename(self.fs):
            self.fs.makedirs(directory, exist_ok=True)
        output.publish(self.fs, directory, base, data, temp_dir=self._join(output.TEMP_DIR))


def _check_same_job(
    url: str, saved: Mapping[str, Any], plan: planner.JobPlan, fingerprint: Mapping[str, Any]
) -> None:
    changed = _differences(saved.get("options", {}), fingerprint)
    if changed:
        detail = "; ".join(changed)
        raise config_lib.JobInputError(
            f"cannot resume {url}: options that decide the output changed ({detail}); "
            "rerun with the original options or pass --overwrite"
        )
    if saved.get("plan") != plan.to_dict():
        # Inputs converted at plan time (OpenAI batch files, synthesize's vars and template)
        # show a change in their recorded size and SHA-256, not in the converted files' rows.
        old_sources = {s["url"]: (s.get("size"), s.get("sha256"))
                       for s in saved.get("plan", {}).get("sources", [])}
        new_sources = {s.url: (s.size, s.sha256) for s in plan.sources}
        changed = sorted(u for u in old_sources.keys() | new_sources.keys()
                         if old_sources.get(u) != new_sources.get(u))
        if changed:
            raise config_lib.JobInputError(
                f"cannot resume {url}: the inputs changed since the job was planned "
                f"({', '.join(changed[:5])}: size or SHA-256 differ from the plan's); pass "
                "--overwrite to start over"
            )
        old_files = {f["url"]: f["num_rows"] for f in saved.get("plan", {}).get("files", [])}
        new_files = {f.url: f.num_rows for f in plan.files}
        diff = sorted(set(old_files.items()) ^ set(new_files.items()))
        raise config_lib.JobInputError(
            f"cannot resume {url}: the inputs changed since the job was planned "
            f"(files/rows that differ: {diff[:5] or 'row groups'}); pass --overwrite to start over"
        )


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"key: was X, now Y"`` for each differing leaf, nested keys dotted (``sampling.n``)."""
    found = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            found.append(f"{prefix}{k}: was {a!r}, now {b!r}")
    return found


def _is_root(url: str) -> bool:
    """Whether ``url`` names a bucket, container or file-system root, from the text alone."""
    protocol, rest = fsspec.core.split_protocol(url.rsplit("::", 1)[-1])
    if protocol in _SINGLE_ROOT_PROTOCOLS:
        if protocol == "memory":
            return not rest.strip("/")
        return os.path.realpath(rest or ".") == os.path.realpath(os.sep)
    return "/" not in rest.strip("/")


def _path_on(fs: fsspec.AbstractFileSystem, url: str) -> str | None:
    """``url``'s normalised path on ``fs``; None when it lies on another kind of file system."""
    protocol, _ = fsspec.core.split_protocol(url)
    try:
        cls = fsspec.get_filesystem_class(protocol or "file")
    except (ValueError, ImportError):
        return None
    if not isinstance(fs, cls):
        return None
    return _normal_path(fs, cls._strip_protocol(url))


def _normal_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):  # symlinks and ``..`` resolved: one file, one name
        return os.path.realpath(path)
    return path.rstrip("/") or path


def _part_names(saved: Mapping[str, Any]) -> set[str]:
    """The part files a run with this saved plan could have written."""
    return {output.part_name(str(s["shard_id"])) for s in saved["plan"]["shards"]}


def _stopped_here(lease: Mapping[str, Any]) -> bool:
    """Whether the lease's holder ran on this host and its process is gone (as git's gc.pid).

    Lets ``--resume`` follow a crashed driver at once on the same machine;
    elsewhere, or while that process id lives, the lease runs out its time.
    """
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _iso(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).isoformat(timespec="seconds")


def request_cancel(url: str, record: bytes) -> dict[str, Any]:
    """Asks the driver running on ``url`` to stop (``griffin-batch cancel``); returns its lease.

    Raises:
      JobInputError: No driver holds the directory now (nothing runs there).
    """
    out = OutputDir(url)
    lease = out._read_lease()
    if lease is None or lease["expires"] <= time.time():
        try:
            state = read_summary(out.fs, out.path).get("status")
        except (OSError, ValueError):
            state = None
        raise config_lib.JobInputError(
            f"no job is running on {out.url} (no driver holds its lease)" + (
                ": there is no job there" if state is None else
                f"; its job is {state}: nothing to cancel" if state == lifecycle.COMPLETED else
                f"; its job stopped ({state}) and needs no cancel: rerun with --resume to "
                "finish it"))
    out.fs.pipe_file(out._join(CANCEL_FILE), record)
    return lease
