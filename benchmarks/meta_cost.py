r"""Cost of the meta-learning steps (MPL, SemiMeta) against the passes they are made of.

  python -m benchmarks.meta_cost --model cnn_small --batch 32 --uratio 1 --steps 5
  python -m benchmarks.meta_cost --model cnn_small --batch 32 --uratio 3 --steps 50 --write

For each of mpl:first_order, mpl:exact, semimeta:first_order and
semimeta:exact, the real jitted train step of the trainer (`train.Stage`:
augmentation on device, the method's step, its optimizer and EMA updates,
metrics) is timed beside the forward/backward passes it executes, each built as
its own jitted function on the same model, batch shapes, mesh and inputs (the
intermediate values of one real step) and timed alone. The components are run
in sequence once and their final state is checked against the real step's
(`max |Δ params| / max |update|`), so the decomposition is the step's own arithmetic, not an
estimate. Reported: step / sum of the components (target <= 1.15: fusing the
passes into one program must not cost more than 15 % over running them alone)
and step / the supervised step on the same model (labeled batch B, and B x
(1 + uratio) images).

Timing: every round times each component and each full step once (interleaved,
so a change of machine load hits them all alike); the figure is the median over
`--steps` rounds after two warm-up calls, each call synchronised with
`block_until_ready`. Per-call dispatch overhead is part of each component's
time, so on tiny models the sum is inflated by one dispatch per component.

Memory: `jit(step).lower(...).compile().memory_analysis()` of the real step for
exact vs first_order (no execution), at `--batch` and at each `--mem_batch`.

`--batch` is the labeled batch B; the unlabeled batch is uratio x B.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):
  # Run as a script (`python benchmarks/meta_cost.py`): the repository root,
  # not benchmarks/, must be on the path for `benchmarks.*` imports.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp

from benchmarks import report
from benchmarks import step_time
from configs import common
from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.methods import mpl
from r2d2_jax.methods import semimeta
from r2d2_jax.methods import uda
from r2d2_jax.methods.base import pseudo_label_monitors, step_metrics

METHODS = ("mpl:first_order", "mpl:exact", "semimeta:first_order",
           "semimeta:exact")
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "peak_memory_in_bytes")


# ---------------------------------------------------------------------------
# Building a stage


def build_stage(model: str, dataset: str, method: str, batch: int, uratio: int,
                workdir: str, total_steps: int = 100) -> tuple[Any, Any]:
  """A `train.Stage` of `method` ('name[:mode]') on fake images of `dataset`.

  Args:
    batch: labeled batch B (the supervised method: its whole batch).
    uratio: unlabeled batch = uratio x B (ignored for 'supervised').

  Returns:
    (stage, pipeline).
  """
  c = common.base_config()
  c.model.name = model
  c.model.dtype = ""
  c.data.dataset = dataset
  c.data.eval_batch_size = 8
  c.total_steps = total_steps
  name, _, mode = method.partition(":")
  c.method = name
  images = batch * (1 + (uratio if name != "supervised" else 0))
  n_train = max(2 * images, 64)
  if name == "supervised":
    c.data.num_labels = -1
    c.data.batch_size = batch
  else:
    step_time.add_method_blocks(c, name, mode)
    # Every term live from step 0 (warm-ups and ramps would zero the teacher's
    # lr, the UDA / consistency weights): the same cost, and a meaningful check
    # that the components reproduce the step.
    c.optimizer.schedule.warmup_steps = 0
    if name == "mpl":
      c.mpl.teacher_optimizer.schedule.warmup_steps = 0
      c.uda.ramp_steps = 0
    elif name == "semimeta":
      c.semimeta.ramp_steps = 0
    c.data.batch_size = batch
    c.data.uratio = uratio
    c.data.unlabeled = "all"
    c.data.num_labels = max(10, n_train // 20 // 10 * 10, batch // 10 * 10)
  arrays = step_time.fake_arrays(dataset, n_train)
  mesh = sharding.make_mesh()
  pipe = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
  stage = train.Stage(c, workdir, mesh=mesh, pipeline=pipe)
  return stage, pipe


def copy_tree(tree):
  """A fresh copy (the real step donates its state)."""
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x,
                      tree)


# ---------------------------------------------------------------------------
# Components: (name, function, args). Each function is jitted on its own; run
# in order, each one's outputs feed the next ones' args.


class Pipeline:
  """Runs jitted components in order and records them for timing."""

  def __init__(self):
    self.components: list[tuple[str, Callable, tuple]] = []

  def __call__(self, name: str, fn: Callable, *args):
    jitted = jax.jit(fn)
    out = jitted(*args)
    jax.block_until_ready(out)
    self.components.append((name, jitted, args))
    return out


def augment_component(p: Pipeline, stage, state, batch):
  specs = train.view_specs(stage.method.views(stage.hp),
                           stage.config.data.augment, stage.info)
  info, aug_key = stage.info, stage._aug_key  # pylint: disable=protected-access
  views = ", ".join(f"{s}: {'+'.join(v)}" for s, v in specs.items())
  return p(f"augment + normalise ({views})",
           lambda b, step: train.prepare_batch(b, aug_key, step, specs, info),
           batch, state.step)


def mpl_components(stage, state, batch) -> tuple[Pipeline, Any]:
  """The passes of `mpl.train_step`, in its order; returns the new state."""
  net, hp = stage.net, stage.hp
  cfg = hp.mpl
  mode, h_kind = cfg.mode, cfg.h
  assert mode in ("first_order", "exact"), mode
  smoothing = hp.label_smoothing
  temperature = cfg.temperature
  t_tx = hp.teacher_tx
  p = Pipeline()
  rng = jax.random.fold_in(stage._step_key, state.step)  # pylint: disable=protected-access
  prep = augment_component(p, stage, state, batch)
  x_l, y_l = prep["labeled"]["weak"], prep["labeled"]["label"]
  x_w, x_s = prep["unlabeled"]["weak"], prep["unlabeled"]["strong"]
  n_l, n_u = x_l.shape[0], x_w.shape[0]
  k_teacher, k_su, k_sl, k_sample = jax.random.split(rng, 4)
  teacher, student = state.teacher, state.student

  def s_logits(params, model_state, x, key):
    return net.apply_train({"params": params, **model_state}, x, key)[0]

  # 1. Teacher forward (vjp kept) + pseudo-labels.
  def teacher_forward(params, model_state, x_l, x_w, x_s):
    def fwd(params):
      return net.apply_train({"params": params, **model_state},
                             jnp.concatenate([x_l, x_w, x_s]), k_teacher)
    t_logits, t_vjp, t_ms = jax.vjp(fwd, params, has_aux=True)
    t_s = t_logits[n_l + n_u:]
    targets = jax.lax.stop_gradient(mpl.pseudo_labels(
        t_s, mode, temperature=temperature,
        sample=cfg.sample_labels, rng=k_sample))
    return t_logits, t_vjp, t_ms, targets

  t_logits, t_vjp, t_ms, targets = p(
      f"teacher forward, train mode, vjp kept ({n_l}+{n_u}+{n_u} images) "
      "+ pseudo-labels", teacher_forward, teacher.params, teacher.model_state,
      x_l, x_w, x_s)

  # 2. Student's real step: forward + backward on strong x_u.
  def student_fwd_bwd(params, model_state, x_s, targets):
    def s_loss(params):
      logits, ms = net.apply_train({"params": params, **model_state}, x_s,
                                   k_su)
      return losses.soft_cross_entropy(logits, targets,
                                       label_smoothing=smoothing), ms
    return jax.value_and_grad(s_loss, has_aux=True)(params)

  if mode == "exact":
    # As the step: one forward+backward, linearised in ŷ, serves the real
    # student step and the inner step of the exact meta-gradient.
    def student_fwd_bwd_lin(params, model_state, x_s, targets):
      def s_grad(y):
        (loss, ms), g = student_fwd_bwd(params, model_state, x_s, y)
        return g, (loss, ms)
      g, lin_y, (loss, ms) = jax.vjp(s_grad, targets, has_aux=True)
      return (loss, ms), g, lin_y

    (s_loss_u, s_ms), s_grads, lin_y = p(
        f"student forward+backward on strong x_u ({n_u} images), linearised "
        "in ŷ (also the exact inner step)", student_fwd_bwd_lin,
        student.params, student.model_state, x_s, targets)
  else:
    (s_loss_u, s_ms), s_grads = p(
        f"student forward+backward on strong x_u ({n_u} images)",
        student_fwd_bwd, student.params, student.model_state, x_s, targets)

  # 3. Student optimizer + EMA.
  new_student = p("student optimizer + EMA update",
                  lambda st, g, ms: st.apply_gradients(g, net.tx, ms,
                                                       net.ema_decay),
                  student, s_grads, s_ms)

  # 4. h: labeled CE before and after the student's step.
  def h_fn(old, new, model_state, x_l, y_l, s_grads, step, baseline):
    ce_l = lambda prm: losses.cross_entropy(
        s_logits(prm, model_state, x_l, k_sl), y_l)
    h_diff, ce_old, ce_new = mpl.h_difference(ce_l, old, new)
    if mode == "first_order" and h_kind == "dot_product":
      h = mpl.h_dot_product(ce_l, old, s_grads, net.schedule(step))
    else:
      h = h_diff
    return jax.lax.stop_gradient(h), ce_old, ce_new

  h_name = f"student labeled forward x2 (CE_old, CE_new; {n_l} images each)"
  if mode == "first_order" and h_kind == "dot_product":
    h_name += f" + labeled forward+backward at θS' ({n_l}) for h"
  h, ce_old, ce_new = p(h_name, h_fn, student.params, new_student.params,
                        student.model_state, x_l, y_l, s_grads, student.step,
                        state.baseline)

  # 5. Teacher loss (UDA [+ first-order term]) and its gradient w.r.t. logits.
  def t_loss_grad(t_logits, targets, y_l, h, baseline, step):
    weight = hp.uda.weight_at(step)
    # The baseline the step subtracts (config.mpl.baseline, as mpl.train_step).
    if cfg.baseline == "updated":
      baseline = mpl.update_baseline(baseline, h, cfg.baseline_decay)
    coef = h - baseline

    def t_loss(logits):
      tl, tw, ts = jnp.split(logits, [n_l, n_l + n_u])
      uda_total, aux = uda.uda_loss(tl, y_l, tw, ts, weight=weight,
                                    **hp.uda.loss_kwargs())
      if mode == "first_order":
        return uda_total + mpl.first_order_term(ts, targets, coef), aux
      return uda_total, aux
    return jax.value_and_grad(t_loss, has_aux=True)(t_logits)

  (t_total, _), g_logits = p(
      "teacher loss on its logits: UDA" +
      (" + first-order MPL term" if mode == "first_order" else "") +
      ", and its gradient w.r.t. the logits",
      t_loss_grad, t_logits, targets, y_l, h, state.baseline, state.step)

  if mode == "exact":
    # 5b. ∇ts L_l(θS − ηS ∇θS CE_u(θS, softmax(ts/τ))): the exact MPL term,
    # from the student's gradient (step 2) and its linearisation in ŷ.
    g_inner = s_grads
    def outer(params, g_inner, model_state, x_l, y_l, step):
      stepped = meta.sgd_step(params, g_inner, net.schedule(step))
      ce_l = lambda prm: losses.cross_entropy(
          s_logits(prm, model_state, x_l, k_sl), y_l)
      return jax.value_and_grad(ce_l)(stepped)

    mpl_term, v = p(
        f"exact: θS' = θS − ηS·g; student labeled forward+backward at θS' "
        f"({n_l} images)", outer, student.params, g_inner,
        student.model_state, x_l, y_l, student.step)

    def second_order(lin_y, t_logits, v, g_logits, step):
      lr = net.schedule(step)
      (g_soft,) = lin_y(jax.tree.map(lambda x: -lr * x, v))
      _, soft_vjp = jax.vjp(
          lambda ts: mpl.pseudo_labels(ts, "exact", temperature=temperature),
          t_logits[n_l + n_u:])
      (g_ts,) = soft_vjp(g_soft)
      return g_logits.at[n_l + n_u:].add(g_ts)

    g_logits = p(
        f"exact: second-order pass, transpose of the inner backward w.r.t. ŷ "
        f"({n_u} images) + softmax vjp", second_order, lin_y, t_logits, v,
        g_logits, student.step)
    del mpl_term

  # 6. Teacher backward.
  (t_grads,) = p(f"teacher backward (vjp, {n_l}+{n_u}+{n_u} images)",
                 lambda vjp, g: vjp(g), t_vjp, g_logits)

  # 7. Teacher optimizer + EMA, baseline.
  new_teacher = p("teacher optimizer + EMA update",
                  lambda st, g, ms: st.apply_gradients(g, t_tx, ms,
                                                       net.ema_decay),
                  teacher, t_grads, t_ms)

  # 8. Metrics (norms, accuracies) and the baseline.
  t_net = hp.teacher(net)

  def metrics(student, new_student, s_grads, teacher, new_teacher, t_grads,
              targets, label, baseline, h):
    m = step_metrics(student, new_student, s_grads, net)
    m.update({f"{k}/teacher": v for k, v in step_metrics(
        teacher, new_teacher, t_grads, t_net).items()})
    m.update(pseudo_label_monitors(targets, label))
    return m, mpl.update_baseline(baseline, h, cfg.baseline_decay)

  _, baseline = p("metrics (norms, accuracy) + baseline", metrics, student,
                  new_student, s_grads, teacher, new_teacher, t_grads, targets,
                  prep["unlabeled"]["label"], state.baseline, h)
  new_state = state.replace(step=state.step + 1, teacher=new_teacher,
                            student=new_student, baseline=baseline)
  del s_loss_u, ce_old, ce_new, t_total
  return p, new_state


def semimeta_components(stage, state, batch) -> tuple[Pipeline, Any]:
  """The passes of `semimeta.train_step`, in its order; returns the new state."""
  net, cfg = stage.net, stage.hp
  p = Pipeline()
  rng = jax.random.fold_in(stage._step_key, state.step)  # pylint: disable=protected-access
  keys = semimeta.step_keys(rng)
  prep = augment_component(p, stage, state, batch)
  x_l, y_l = prep["labeled"]["weak"], prep["labeled"]["label"]
  x_u = prep["unlabeled"]["weak"]
  n_l, n = x_l.shape[0], x_u.shape[0]
  bn = cfg.meta_bn

  def fwd(params, model_state, x):
    if bn == "train":
      return net.apply_train({"params": params, **model_state}, x,
                             keys["meta"])[0]
    return net.apply_eval({"params": params, **model_state}, x)

  def alpha_of(step):
    lr = net.schedule(step)
    return lr if cfg.inner_lr is None else cfg.inner_lr

  if cfg.mode == "first_order":
    def labeled_grad(params, model_state, x_l, y_l):
      return jax.grad(lambda prm: losses.cross_entropy(
          fwd(prm, model_state, x_l), y_l))(params)

    g = p(f"labeled forward+backward g = ∇θ CE ({n_l} images, meta BN "
          f"{bn})", labeled_grad, state.params, state.model_state, x_l, y_l)

    def jvp(params, model_state, x_u, g, step):
      probs, j_g = jax.jvp(lambda prm: jax.nn.softmax(fwd(prm, model_state,
                                                          x_u)),
                           (params,), (g,))
      return (2.0 * alpha_of(step) / n) * j_g, probs

    g_y, y_tilde = p(f"jvp of softmax(f(x_u)) along g ({n} images; primal "
                     "= ỹ)", jvp, state.params, state.model_state, x_u, g,
                     state.step)
  else:
    y_tilde = p(f"ỹ = softmax(f(x_u)) forward ({n} images)",
                lambda prm, ms, x: jax.lax.stop_gradient(jax.nn.softmax(
                    fwd(prm, ms, x))), state.params, state.model_state, x_u)

    def inner(params, model_state, x_u, y_tilde):
      lu = lambda prm, y: semimeta.consistency_loss(fwd(prm, model_state,
                                                        x_u), y)
      return jax.vjp(lambda y: jax.grad(lu)(params, y), y_tilde)

    g_inner, lin_y = p(f"inner forward+backward ∇θ L_u(θ, ỹ) ({n} images), "
                       "linearised in ỹ", inner, state.params,
                       state.model_state, x_u, y_tilde)

    def outer(params, g_inner, model_state, x_l, y_l, step):
      stepped = meta.sgd_step(params, g_inner, alpha_of(step))
      return jax.grad(lambda prm: losses.cross_entropy(
          fwd(prm, model_state, x_l), y_l))(stepped)

    v = p(f"θ̃ = θ − α·g; labeled forward+backward at θ̃ ({n_l} images)",
          outer, state.params, g_inner, state.model_state, x_l, y_l,
          state.step)

    def second_order(lin_y, v, step):
      a = alpha_of(step)
      return lin_y(jax.tree.map(lambda x: -a * x, v))[0]

    g_y = p(f"second-order pass: transpose of the inner backward w.r.t. ỹ "
            f"({n} images)", second_order, lin_y, v, state.step)

  def labels_mixup(y_tilde, g_y, x_l, y_l, x_u, step):
    y_hat = jax.lax.stop_gradient(semimeta.update_labels(
        y_tilde, g_y, cfg.label_lr * n))
    weight = cfg.weight * meta.linear_ramp(step, cfg.ramp_steps)
    t_l = jax.nn.one_hot(y_l, stage.task.num_classes, dtype=y_hat.dtype)
    if cfg.mixup_alpha > 0:
      x_sup, t_sup = semimeta.mixup(keys["mix"], x_l, t_l, x_u, y_hat,
                                    cfg.mixup_alpha)
    else:
      x_sup, t_sup = x_l, t_l
    return y_hat, weight, x_sup, t_sup

  y_hat, weight, x_sup, t_sup = p("label update ŷ + mixup", labels_mixup,
                                  y_tilde, g_y, x_l, y_l, x_u, state.step)

  def final_forward(params, model_state, x_sup, x_u, t_sup, y_hat, weight):
    def loss_fn(params):
      logits_sup, ms = net.apply_train({"params": params, **model_state},
                                       x_sup, keys["forward_mix"])
      logits_u, ms = net.apply_train({"params": params, **ms}, x_u,
                                     keys["forward_unlabeled"])
      xe = losses.soft_cross_entropy(logits_sup, t_sup)
      cons = semimeta.consistency_loss(logits_u, y_hat)
      return xe + weight * cons, (xe, cons, logits_u, ms)
    return jax.vjp(loss_fn, params, has_aux=True)

  loss, loss_vjp, (xe, cons, logits_u, ms) = p(
      f"final forwards, vjp kept: mixed batch ({x_sup.shape[0]}) then x_u "
      f"({n})", final_forward, state.params, state.model_state, x_sup, x_u,
      t_sup, y_hat, weight)
  (grads,) = p(f"final backward ({x_sup.shape[0]} + {n} images)",
               lambda vjp: vjp(jnp.ones((), jnp.float32)), loss_vjp)
  new_state = p("optimizer + EMA update",
                lambda st, g, ms: st.apply_gradients(g, net.tx, ms,
                                                     net.ema_decay),
                state, grads, ms)

  def metrics(state, new_state, grads, y_hat, y_tilde, logits_u, label):
    m = step_metrics(state, new_state, grads, net)
    m.update({"lc": jnp.mean(jnp.sum(jnp.abs(y_hat - y_tilde), -1)),
              "a1": losses.accuracy(y_hat, label),
              "a2": losses.accuracy(y_tilde, label),
              "a3": losses.accuracy(logits_u, label)})
    return m

  p("metrics (norms, accuracies)", metrics, state, new_state, grads, y_hat,
    y_tilde, logits_u, prep["unlabeled"]["label"])
  del loss, xe, cons
  return p, new_state


def max_param_diff(a, b, start=None) -> float:
  """max |a − b| over every params leaf (teacher and student for MPL).

  With `start`, divided by max |a − start| (the size of the step's update).
  """
  def params(s):
    if isinstance(s, mpl.MPLState):
      return {"teacher": s.teacher.params, "student": s.student.params}
    return s.params
  def maxdiff(x, y):
    return max(jax.tree.leaves(jax.tree.map(
        lambda u, v: float(jnp.max(jnp.abs(u - v))), params(x), params(y))))
  d = maxdiff(a, b)
  return d / maxdiff(a, start) if start is not None else d


# ---------------------------------------------------------------------------
# Timing


def time_rounds(callables: dict[str, Callable[[], Any]], rounds: int,
                warmup: int = 2) -> dict[str, tuple[float, float]]:
  """(wall ms, process CPU ms) medians of each callable, over `rounds` rounds.

  Interleaved: each round calls every callable once. CPU time (all threads of
  this process) is much less sensitive to other processes than wall time.
  """
  for _ in range(warmup):
    for f in callables.values():
      jax.block_until_ready(f())
  wall = {k: [] for k in callables}
  cpu = {k: [] for k in callables}
  for _ in range(rounds):
    for k, f in callables.items():
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(f())
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  return {k: (statistics.median(wall[k]) * 1e3,
              statistics.median(cpu[k]) * 1e3) for k in callables}


def cost(compiled) -> tuple[float, int]:
  """(XLA's flop estimate, number of convolution ops) of a compiled program."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  convs = len(re.findall(r"convolution\(", compiled.as_text()))
  return float((ca or {}).get("flops", 0.0)), convs


class StepRunner:
  """Calls a stage's real train step on its own (donated) state."""

  def __init__(self, stage, state, batch):
    self.stage, self.state, self.batch = stage, copy_tree(state), batch

  def __call__(self):
    self.state, m = self.stage.train_step(self.state, self.batch)
    return m


def memory(stage, pipe, streams) -> dict[str, int]:
  batch = pipe.global_batch(0, streams)
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      batch)
  stats = stage.train_step.lower(stage.abstract_state,
                                 abstract_batch).compile().memory_analysis()
  if stats is None:
    return {}
  return {f: getattr(stats, f) for f in dir(stats)
          if f.endswith("_in_bytes") and not f.startswith("_")}


def mib(x: int) -> str:
  return f"{x / 2**20:.2f}"


# ---------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="cnn_small")
  parser.add_argument("--dataset", default="mnist")
  parser.add_argument("--batch", type=int, default=32,
                      help="labeled batch B")
  parser.add_argument("--uratio", type=int, default=3,
                      help="unlabeled batch = uratio x B")
  parser.add_argument("--steps", type=int, default=20,
                      help="timed rounds (median)")
  parser.add_argument("--methods", nargs="*", default=list(METHODS))
  parser.add_argument("--mem_batch", type=int, nargs="*", default=[256],
                      help="extra labeled batches for the memory analysis "
                      "(compiled only, not run)")
  parser.add_argument("--write", action="store_true",
                      help="write section meta_cost_<model> of "
                      "docs/benchmarks.md")
  args = parser.parse_args()
  load_start = os.getloadavg()
  B, u = args.batch, args.uratio
  results, mem_rows = {}, []
  with tempfile.TemporaryDirectory() as wd:
    sup = {}
    for label, b in (("B", B), ("B(1+u)", B * (1 + u))):
      stage, pipe = build_stage(args.model, args.dataset, "supervised", b, 0,
                                os.path.join(wd, f"sup{b}"))
      sup[label] = StepRunner(stage, stage.init_state(),
                              pipe.global_batch(0, stage.streams))
    sup_ms = time_rounds(sup, args.steps)
    print(f"supervised step (wall / CPU ms): batch {B}: "
          f"{sup_ms['B'][0]:.3f} / {sup_ms['B'][1]:.3f}; batch {B * (1 + u)}: "
          f"{sup_ms['B(1+u)'][0]:.3f} / {sup_ms['B(1+u)'][1]:.3f}", flush=True)

    for method in args.methods:
      stage, pipe = build_stage(args.model, args.dataset, method, B, u,
                                os.path.join(wd, method.replace(":", "_")))
      state = stage.init_state()
      batch = pipe.global_batch(0, stage.streams)
      t0 = time.perf_counter()
      step_compiled = stage.train_step.lower(state, batch).compile()
      compile_s = time.perf_counter() - t0
      ref_state, _ = stage.train_step(copy_tree(state), batch)
      build = (mpl_components if method.startswith("mpl")
               else semimeta_components)
      comps, comp_state = build(stage, copy_tree(state), batch)
      diff = max_param_diff(ref_state, comp_state, state)
      costs = [cost(fn.lower(*a).compile()) for _, fn, a in comps.components]
      step_cost = cost(step_compiled)
      callables = {f"{i}": functools.partial(fn, *a)
                   for i, (_, fn, a) in enumerate(comps.components)}
      callables["step"] = StepRunner(stage, state, batch)
      ms = time_rounds(callables, args.steps)
      rows = [(name, *ms[f"{i}"], *costs[i]) for i, (name, _, _) in
              enumerate(comps.components)]
      total = tuple(sum(r[k] for r in rows) for k in (1, 2, 3, 4))
      r = {"rows": rows, "sum": total, "step": (*ms["step"], *step_cost),
           "diff": diff, "compile_s": compile_s}
      results[method] = r
      print(f"\n== {method}: B={B} labeled + {u * B} unlabeled; compile "
            f"{compile_s:.1f}s; components vs real step: max |Δ params| / "
            f"max |update| {diff:.2e}\n  {'wall ms':>9s} {'CPU ms':>9s} {'share':>6s} "
            f"{'MFLOP':>9s} {'convs':>5s}")
      for name, w, c, fl, cv in rows:
        print(f"  {w:9.3f} {c:9.3f} {100 * w / total[0]:5.1f}% "
              f"{fl / 1e6:9.1f} {cv:5d}  {name}")
      st = r["step"]
      print(f"  {total[0]:9.3f} {total[1]:9.3f} {'':6s} {total[2] / 1e6:9.1f} "
            f"{total[3]:5d}  sum of components\n"
            f"  {st[0]:9.3f} {st[1]:9.3f} {'':6s} {st[2] / 1e6:9.1f} "
            f"{st[3]:5d}  real step\n"
            f"  step/sum: wall {st[0] / total[0]:.3f}, CPU "
            f"{st[1] / total[1]:.3f}, flops {st[2] / total[2]:.3f} "
            f"(target <= 1.15); step/supervised({B}) wall "
            f"{st[0] / sup_ms['B'][0]:.2f} CPU {st[1] / sup_ms['B'][1]:.2f}; "
            f"step/supervised({B * (1 + u)}) wall "
            f"{st[0] / sup_ms['B(1+u)'][0]:.2f} CPU "
            f"{st[1] / sup_ms['B(1+u)'][1]:.2f}", flush=True)

    fields_seen = None
    for b in [B] + [m for m in args.mem_batch if m != B]:
      for method in args.methods:
        stage, pipe = build_stage(
            args.model, args.dataset, method, b, u,
            os.path.join(wd, f"mem_{b}_{method.replace(':', '_')}"))
        stats = memory(stage, pipe, stage.streams)
        if fields_seen is None:
          fields_seen = sorted(stats)
          print(f"\nmemory_analysis() fields in jax {jax.__version__}: "
                f"{fields_seen}")
        mem_rows.append((b, method, stats))
        print(f"memory B={b:5d} {method:22s} " + "  ".join(
            f"{f.replace('_size_in_bytes', '').replace('_in_bytes', '')} "
            f"{mib(stats.get(f, 0))}MiB" for f in MEMORY_FIELDS if f in stats),
              flush=True)
  load_end = os.getloadavg()
  print(f"\nload average (1, 5, 15 min): start "
        f"{', '.join(f'{x:.2f}' for x in load_start)}; end "
        f"{', '.join(f'{x:.2f}' for x in load_end)}")
  if args.write:
    write_doc(args, sup_ms, results, mem_rows, fields_seen or [], load_start,
              load_end)


def write_doc(args, sup_ms, results, mem_rows, fields, load_start, load_end):
  B, u = args.batch, args.uratio
  fmt = lambda la: ", ".join(f"{x:.2f}" for x in la)
  lines = [
      f"## Meta-learning step cost: `{args.model}`", "",
      "Command: `" + " ".join(["python -m benchmarks.meta_cost",
                               *sys.argv[1:]]) + "`", "",
      f"Measured: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
      f" UTC; {report.environment()}; load average (1, 5, 15 min) "
      f"{fmt(load_start)} at the start, {fmt(load_end)} at the end.", "",
      f"Model `{args.model}`, {args.dataset}-shaped images, B = {B} labeled + "
      f"{u * B} unlabeled (uratio {u}); medians of {args.steps} interleaved "
      "rounds, wall time and process CPU time. Each component is the step's "
      "own computation on the step's inputs, jitted and timed alone; run in "
      "sequence they reproduce the real step's new parameters (max abs Δ "
      "params / max abs update; warm-ups and loss ramps are set to 0 so that "
      "every term is live). The real step is `train.Stage.train_step` (augmentation, "
      "method, optimizer, EMA, metrics). MFLOP and convs: XLA's "
      "`cost_analysis()` flops and the convolution ops of each compiled "
      "program (independent of load). Supervised step (wall / CPU ms): "
      f"{sup_ms['B'][0]:.3f} / {sup_ms['B'][1]:.3f} at batch {B}, "
      f"{sup_ms['B(1+u)'][0]:.3f} / {sup_ms['B(1+u)'][1]:.3f} at batch "
      f"{B * (1 + u)}.", "",
      "| method | sum ms (wall / CPU) | step ms (wall / CPU) | step / sum "
      "wall | step / sum CPU | step / sum flops | step / supervised "
      f"({B}), wall | step / supervised ({B * (1 + u)}), wall | max abs Δ "
      "params / update |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for method, r in results.items():
    t, st = r["sum"], r["step"]
    lines.append(
        f"| {method} | {t[0]:.2f} / {t[1]:.2f} | {st[0]:.2f} / {st[1]:.2f} | "
        f"{st[0] / t[0]:.3f} | {st[1] / t[1]:.3f} | {st[2] / t[2]:.3f} | "
        f"{st[0] / sup_ms['B'][0]:.2f} | {st[0] / sup_ms['B(1+u)'][0]:.2f} | "
        f"{r['diff']:.1e} |")
  lines += ["", "Target: step / sum <= 1.15."]
  for method, r in results.items():
    t, st = r["sum"], r["step"]
    lines += ["", f"Components of `{method}`:", "",
              "| component | wall ms | CPU ms | share (wall) | MFLOP | convs |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, w, c, fl, cv in r["rows"]:
      lines.append(f"| {name} | {w:.3f} | {c:.3f} | {100 * w / t[0]:.1f}% | "
                   f"{fl / 1e6:.1f} | {cv} |")
    lines.append(f"| **sum** | {t[0]:.3f} | {t[1]:.3f} | | {t[2] / 1e6:.1f} | "
                 f"{t[3]} |")
    lines.append(f"| **real step** | {st[0]:.3f} | {st[1]:.3f} | | "
                 f"{st[2] / 1e6:.1f} | {st[3]} |")
  shown = [f for f in MEMORY_FIELDS if f in fields]
  lines += [
      "", "Memory of the compiled real step "
      "(`jit(step).lower(...).compile().memory_analysis()`, MiB; no "
      f"execution). Fields in this JAX: {', '.join(f'`{f}`' for f in fields)}.",
      "", "| labeled batch | method | " + " | ".join(
          f.replace("_in_bytes", "") for f in shown) + " | temp / first_order |",
      "| ---: | --- | " + " | ".join("---:" for _ in shown) + " | ---: |"]
  by = {(b, m): s for b, m, s in mem_rows}
  for b, method, s in mem_rows:
    base = by.get((b, method.split(":")[0] + ":first_order"), {})
    ratio = (f"{s['temp_size_in_bytes'] / base['temp_size_in_bytes']:.2f}"
             if base.get("temp_size_in_bytes") else "")
    lines.append(f"| {b} | {method} | " + " | ".join(
        mib(s.get(f, 0)) for f in shown) + f" | {ratio} |")
  report.write_section(f"meta_cost_{args.model}", "\n".join(lines))


if __name__ == "__main__":
  main()
