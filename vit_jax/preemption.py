"""Preemption: a SIGTERM (TPU maintenance, a reclaimed spot VM, a SLURM time limit) makes the run save a
checkpoint and stop, at the same step on every process (`errors.Preempted`: exit status 75, rerun the same
command and it resumes from that checkpoint).

With several processes, JAX's preemption service (started by `jax.distributed.initialize`) receives the
signal on any process and agrees with the others on the step to stop at; alone, a signal handler notes it.
"""
import signal

import jax
from jax.experimental import multihost_utils


class Watch:
  """`reached(step)` is True at the step where every process should save and stop. Call it at every step,
  on every process (the multi-process protocol counts steps)."""

  def __init__(self):
    self.signalled = False
    self.previous_handler = None
    self.shared = jax.process_count() > 1
    if not self.shared:
      try:
        self.previous_handler = signal.signal(signal.SIGTERM, self._note)
      except ValueError:  # Not the main thread (e.g. a run started from a notebook's worker thread).
        pass

  def _note(self, signum, frame):  # pylint: disable=unused-argument
    self.signalled = True

  def reached(self, step: int) -> bool:
    if self.shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled

  def close(self) -> None:
    if self.previous_handler is not None:
      signal.signal(signal.SIGTERM, self.previous_handler)
      self.previous_handler = None
