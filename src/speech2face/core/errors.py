"""The one base class of the project's expected failures.

An expected failure is something a user can fix or a run must record: a bad value in
params.yaml, a missing input, an unreachable cluster, an unusable model file, a clip that
does not decode. Its message is one line that says what and where. A stage script maps
``Speech2FaceError`` to ``<stage>: <message>`` and exit status 1 (speech2face.core.stage);
anything else is a bug and keeps its traceback.

Per-clip failures (``MediaError``, ``DownloadFailure``) are caught inside their stage and
become that clip's recorded reason; they derive from the base class too, so that a stage
that does not catch one still stops with one line.
"""

from __future__ import annotations


class Speech2FaceError(Exception):
    """An expected failure with a one-line message."""


class MissingInputError(Speech2FaceError, FileNotFoundError):
    """A stage's input is not there (usually: an earlier stage has not run)."""


class WorkerError(Speech2FaceError, RuntimeError):
    """Worker processes could not start (their set-up failed, e.g. a model did not load)."""


class DataError(Speech2FaceError, ValueError):
    """The inputs are there but cannot be used (no usable faces, no training pairs, ...)."""
