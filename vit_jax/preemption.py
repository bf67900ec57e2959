"""Preemption: a SIGTERM (TPU maintenance, a reclaimed spot VM, a SLURM time limit) makes the run save a
checkpoint and stop, at the same step on every process (`errors.Preempted`: exit status 75, rerun the same
command and it resumes from that checkpoint).

With several processes, JAX's preemption service (started by `jax.distributed.initialize`) receives the
signal on any process and agrees with the others on the step to stop at; alone, a signal handler notes it.

A Ctrl-C (SIGINT) is a preemption the user asked for: the run saves and stops the same way, but exits 130,
not 75 (no launcher should rerun it). With several processes it is handed to JAX's service as a SIGTERM, so
that every process stops at the same step. A second Ctrl-C stops at once (`KeyboardInterrupt`); checkpoints
are renamed into place only when complete, so the newest committed one stays intact.
"""
import os
import signal

import jax
from jax.experimental import multihost_utils


class Watch:
  """`reached(step)` is True at the step where every process should save and stop. Call it at every step,
  on every process (the multi-process protocol counts steps)."""

  def __init__(self):
    self.signalled = False
    self.interrupted = False  # By Ctrl-C.
    self.previous_handlers = {}
    self.shared = jax.process_count() > 1
    try:
      if not self.shared:
        self.previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note)
      self.previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
    except ValueError:  # Not the main thread (e.g. a run started from a notebook's worker thread).
      pass

  def _note(self, signum, frame):  # pylint: disable=unused-argument
    self.signalled = True

  def _interrupt(self, signum, frame):
    if self.interrupted:
      raise KeyboardInterrupt  # The second Ctrl-C: stop now.
    self.interrupted = True
    if self.shared:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service agrees on the step with the others.
    else:
      self._note(signum, frame)

  def reached(self, step: int) -> bool:
    if self.shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled

  def close(self) -> None:
    for signum, handler in self.previous_handlers.items():
      signal.signal(signum, handler)
    self.previous_handlers = {}
