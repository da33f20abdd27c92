"""Nothing lost: SIGKILL, SIGTERM and a kill in mid-save all resume bit for bit.

The end-to-end test runs `python -m r2d2_jax.main` (through tests/fault_worker.py)
on a three-stage config (supervised → R2-D2 → MPL, 6 steps each, a checkpoint
every 2 steps) as subprocesses, interrupts it three times, reruns the same
command to completion and compares every array of each stage's final checkpoint
with an uninterrupted run's. The other tests are in-process and quick.
"""

import os
import random
import re
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import methods
from r2d2_jax import train
from r2d2_jax.errors import NonFiniteError, Preempted
from r2d2_jax.methods import supervised
from tests import fault_worker
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "tests/fault_worker.py"
# Kept between sessions: the subprocesses compile the same programs every time.
CACHE = os.environ.get("R2D2_TEST_SUBPROCESS_JAX_CACHE", os.path.join(
    tempfile.gettempdir(), "r2d2_jax_fault_tests_cache"))


def _env(**extra):
  return helpers.subprocess_env(CACHE, drop=("R2D2_FAULT_KILL_IN_SAVE",),
                                **extra)


class _Run(helpers.Background):
  """`python -m tests.fault_worker --config ... --workdir ...` in the background."""

  def __init__(self, workdir, variant="", log=None, **env):
    self.workdir = str(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    config = CONFIG + (f":{variant}" if variant else "")
    super().__init__(
        "tests.fault_worker", ["--config", config, "--workdir", self.workdir],
        _env(**env), log or f"{self.workdir}.{time.monotonic_ns()}.log",
        timeout=240)

  def wait_for_checkpoint(self, stage, step, timeout=240):
    """Returns once `stage` has a checkpoint at `step` or later."""
    folder = os.path.join(self.workdir, stage, "checkpoints")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise AssertionError(f"exited with {self.proc.returncode} before "
                             f"{stage} step {step}:\n{self.output()[-3000:]}")
      if os.path.isdir(folder) and any(
          n.isdigit() and int(n) >= step for n in os.listdir(folder)):
        return
      time.sleep(0.02)
    self.proc.kill()
    raise AssertionError(f"no {stage} checkpoint {step} in {timeout}s")


def _assert_bitwise_equal(workdir_a, workdir_b):
  for stage in fault_worker.STAGES:
    a, meta_a = ckpt_lib.restore_raw(os.path.join(workdir_a, stage))
    b, meta_b = ckpt_lib.restore_raw(os.path.join(workdir_b, stage))
    assert meta_a["step"] == meta_b["step"] == fault_worker.STEPS, stage
    assert jax.tree.structure(a) == jax.tree.structure(b), stage
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                            jax.tree.leaves(b)):
      assert np.array_equal(x, y), (
          f"{stage}{jax.tree_util.keystr(path)} differs after the interruptions")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run, started at once and run beside the faulty ones."""
  wd = tmp_path_factory.mktemp("reference") / "wd"
  run = _Run(wd)
  yield run
  if run.proc.poll() is None:
    run.proc.kill()


def test_kill_in_save_sigkill_and_sigterm_resume_bitwise(tmp_path, reference):
  rng = random.Random(20240611)
  wd = str(tmp_path / "wd")

  # 1. Killed in the middle of saving supervised step 4 (async saves): every
  #    file written, the rename to '4' not done. The rerun resumes from 2.
  target = os.path.join(wd, "supervised", "checkpoints", "4")
  run = _Run(wd, "async", R2D2_FAULT_KILL_IN_SAVE=target)
  assert run.wait() == -signal.SIGKILL, run.output()[-3000:]
  ckdir = os.path.join(wd, "supervised", "checkpoints")
  assert sorted(os.listdir(ckdir)) == ["2", "4.orbax-checkpoint-tmp"]
  assert ckpt_lib.Checkpointer(ckdir).latest_step() == 2

  # 2. SIGKILL at a random moment of the R2-D2 stage (async saves: possibly
  #    in the middle of one), after its checkpoint 2 or 4.
  run = _Run(wd, "async")
  run.wait_for_checkpoint("r2d2", rng.choice([2, 4]))
  time.sleep(rng.uniform(0.0, 0.5))
  run.proc.kill()
  assert run.wait() == -signal.SIGKILL
  out = run.output()
  assert "Resuming supervised from step 2" in out, out[-3000:]
  assert sorted(os.listdir(ckdir)) == ["4", "6"]  # the tmp folder is replaced

  # 3. SIGTERM in the MPL stage: exit 143 with the message, and a checkpoint at
  #    the step it names.
  run = _Run(wd)
  run.wait_for_checkpoint("mpl", 2)
  time.sleep(rng.uniform(0.0, 0.3))
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait() == 143, run.output()[-3000:]
  out = run.output()
  assert "Traceback" not in out
  m = re.search(r"Preempted at step (\d+) of mpl; saved; rerun the same "
                r"command to resume\.", out)
  assert m, out[-3000:]
  step = int(m.group(1))
  assert os.path.isdir(os.path.join(wd, "mpl", "checkpoints", str(step)))
  assert ckpt_lib.Checkpointer(os.path.join(wd, "mpl", "checkpoints")
                               ).latest_step() == step

  # 4. The same command again finishes; every stage ends bit for bit as the
  #    uninterrupted run.
  run = _Run(wd)
  assert run.wait() == 0, run.output()[-3000:]
  assert (f"Resuming mpl from step {step}" if step < fault_worker.STEPS else
          "mpl already complete") in run.output()
  assert reference.wait() == 0, reference.output()[-3000:]
  _assert_bitwise_equal(reference.workdir, wd)


# ---------------------------------------------------------------------------
# In-process


def _sigterm_method(at_step):
  """Supervised, but a SIGTERM arrives (to this process) before step `at_step`."""
  def hook(hooks, state, step):
    del hooks
    if step == at_step - 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return state, {}
  return methods.Method(name="sigterm", hparams=supervised.hparams,
                        views=supervised.views,
                        train_step=supervised.train_step, hooks=(hook,))


def test_sigterm_saves_that_step_and_resumes_bitwise(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, "sigterm", _sigterm_method(3))
  c = helpers.tiny_config("supervised", total_steps=6, checkpoint_every_steps=4,
                          checkpoint_async=True)
  c.stage_order = ("first", "second")
  c.stages = {"first": {"method": "sigterm"}, "second": {"total_steps": 1}}
  seen = []
  handler = lambda *a: seen.append(a)
  previous = signal.signal(signal.SIGTERM, handler)
  try:
    with pytest.raises(Preempted, match=r"^Preempted at step 3 of first; "
                       r"saved; rerun the same command to resume\.$") as e:
      train.train_and_evaluate(c, str(tmp_path / "a"))
    # The handler it replaced is back; the next stage did not start.
    assert signal.getsignal(signal.SIGTERM) is handler and not seen
    os.kill(os.getpid(), signal.SIGTERM)
    assert len(seen) == 1
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert e.value.step == 3 and e.value.stage == "first"
  ck = ckpt_lib.Checkpointer(str(tmp_path / "a" / "first" / "checkpoints"))
  assert ck.latest_step() == 3
  assert not os.path.exists(tmp_path / "a" / "second")
  # The rerun resumes at 3 and goes on to the next stage (the subprocess test
  # above checks that a resumed run ends bit for bit as an uninterrupted one).
  monkeypatch.setitem(methods.METHODS, "sigterm", _sigterm_method(-10))
  res = train.train_and_evaluate(c, str(tmp_path / "a"))
  assert set(res) == {"first", "second"}
  _, meta = ckpt_lib.restore_raw(str(tmp_path / "a" / "second"))
  assert meta["step"] == 1


def test_preemption_uses_local_flag_in_one_process():
  watch = train.PreemptionWatch()
  assert not watch.sync  # one process: no sync manager needed
  previous = signal.getsignal(signal.SIGTERM)
  watch.install()
  try:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(2)
  finally:
    watch.restore()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_several_processes_stop_at_the_sync_point(tmp_path, monkeypatch):
  """With jax's preemption service, its sync point (same on every process) decides."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  asked = []
  monkeypatch.setattr(train, "_preemption_sync_available", lambda: True)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: asked.append(step) or step == 4)
  before = signal.getsignal(signal.SIGTERM)
  c = helpers.tiny_config(total_steps=6, checkpoint_every_steps=3)
  stage = train.Stage(c, str(tmp_path))
  with pytest.raises(Preempted, match="^Preempted at step 4 of the run;"):
    stage.run()
  # Asked at every step (orbax asks too, when it saves).
  assert sorted(set(asked)) == [1, 2, 3, 4]
  assert signal.getsignal(signal.SIGTERM) is before  # jax's handler stays
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4


def _save_steps(directory, steps):
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=5, async_save=False)
  for s in steps:
    ck.save(s, {"w": jnp.full((3,), float(s))}, {"step": s})
  ck.close()


def test_leftovers_of_a_killed_save_are_not_a_checkpoint(tmp_path):
  d = str(tmp_path / "ck")
  _save_steps(d, [2, 4])
  # What a save killed before its rename leaves (see test above), and a step
  # folder missing an item (an interrupted deletion, a non-atomic filesystem).
  os.rename(os.path.join(d, "4"), os.path.join(d, "6.orbax-checkpoint-tmp"))
  _save_steps(str(tmp_path / "other"), [8])
  os.makedirs(os.path.join(d, "8"))
  os.rename(os.path.join(tmp_path, "other", "8", "meta"),
            os.path.join(d, "8", "meta"))
  ck = ckpt_lib.Checkpointer(d)
  assert ck.latest_step() == 2
  state, meta = ckpt_lib.restore_raw(d)
  assert meta["step"] == 2 and np.array_equal(state["w"], [2.0, 2.0, 2.0])
  ck.save(6, {"w": jnp.full((3,), 6.0)}, {"step": 6})
  ck.close()
  assert ckpt_lib.Checkpointer(d).latest_step() == 6
  state, _ = ckpt_lib.restore_raw(d)
  assert np.array_equal(state["w"], [6.0, 6.0, 6.0])
  assert not os.path.exists(os.path.join(d, "6.orbax-checkpoint-tmp"))


def test_non_finite_loss_under_sigterm_does_not_save_it(tmp_path, monkeypatch):
  """A SIGTERM at a non-finite step stops with the non-finite error, unsaved."""
  monkeypatch.setitem(methods.METHODS, "nan_at_3", helpers.nan_method())
  c = helpers.tiny_config("nan_at_3", total_steps=6, checkpoint_every_steps=2,
                          log_every_steps=5)
  monkeypatch.setattr(train.PreemptionWatch, "reached",
                      lambda self, step: step == 3)
  with pytest.raises(NonFiniteError, match=r"step 3.*checkpoint \(step 2\)"):
    train.train_and_evaluate(c, str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
