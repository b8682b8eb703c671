"""Jobs that run in stages (``summarize --mode map-reduce``): where each stage runs, which one runs now.

An earlier stage is an ordinary job directory under ``<output>/_stages/<name>/``
(``manifest.STAGES_DIR``), with its own plan, lease and ``_summary.json``; the
last stage runs in ``<output>`` itself. ``current`` tells ``griffin-batch
status`` and ``cancel`` which of them to read, from the output directory alone.
"""

from __future__ import annotations

import posixpath

import fsspec

from griffin_batch.jobs import manifest


def stage_url(output_url: str, name: str) -> str:
    """The directory stage ``name`` of the job in ``output_url`` runs in."""
    return f"{output_url.rstrip('/')}/{manifest.STAGES_DIR}/{name}"


def current(output_url: str) -> str:
    """The directory whose ``_summary.json`` describes the job in ``output_url`` now.

    ``output_url`` itself once its last stage has a summary newer than every earlier
    stage's (or when it has no stages); else the stage whose summary was updated
    last. Unreadable summaries count as absent.
    """
    fs, path = fsspec.core.url_to_fs(output_url)
    path = path.rstrip("/")
    try:
        names = [posixpath.basename(p.rstrip("/"))
                 for p in fs.ls(f"{path}/{manifest.STAGES_DIR}", detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return output_url
    best, newest = output_url, _updated_at(fs, path)
    for name in sorted(names):
        when = _updated_at(fs, f"{path}/{manifest.STAGES_DIR}/{name}")
        if when is not None and (newest is None or when > newest):
            best, newest = stage_url(output_url, name), when
    return best


def _updated_at(fs: fsspec.AbstractFileSystem, directory: str) -> float | None:
    try:
        return float(manifest.read_summary(fs, directory).get("updated_at", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
