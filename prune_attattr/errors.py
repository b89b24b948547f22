"""Errors a run ends with: one line saying what is wrong and what to do (the CLI exits 2 on them).

This module imports nothing from the project, so every layer (tasks, analyses, pipeline) can raise
them without importing the pipeline.
"""

from __future__ import annotations

__all__ = ["RunError", "OutputExists", "Terminated"]


class RunError(RuntimeError):
    """A run that cannot go on (message says why and what to do)."""


class OutputExists(RunError):
    """The run's output folder exists and ``force`` was not given."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (``kill``, ``timeout``, SLURM, Kubernetes); handled like Ctrl-C.

    A ``KeyboardInterrupt`` subclass so every ``finally``/cleanup written for Ctrl-C also runs for it.
    """
