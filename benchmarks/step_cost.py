r"""Step time, compile time and memory of YellowFin's update vs Optax's.

Times the jitted optimizer update alone (``grads, state -> updates, state``,
state donated as in a real train step, warm-up excluded, ``block_until_ready``)
for :func:`yellowfin_optax.yellowfin`, :func:`closed_loop_yellowfin` (when the
library has it), ``optax.adam(1e-3)``, ``optax.sgd(1e-2, momentum=0.9)`` and
:func:`yellowfin_floor` (YellowFin's data flow without its tuner: the limit
any implementation pays), side by side in one process and interleaved (the
order is shuffled every round), so the ratios survive a loaded machine. Also:

* one leaf of 1M / 10M / 100M float32 parameters (``--sizes``), and the same
  10M split over 200 leaves of mixed shapes (``--leaves``);
* the full train step (forward + backward + update) of a Flax MLP, so the
  optimizer's share of a step is visible;
* compile time (``lower().compile()``), optimizer state bytes as a multiple of
  the parameter bytes, XLA's ``cost_analysis()`` bytes accessed, the number of
  passes over parameter-size buffers in the compiled HLO, and the achieved
  bandwidth against a measured streaming reference (``a + c * b``).

``--compare PATH`` also loads a second copy of ``yellowfin_optax`` from PATH
(e.g. a scratch copy with optimisations) and times it in the same interleaved
rounds, labelled ``yellowfin@PATH``.

Writes ``step_cost.md``, ``step_cost.json`` and ``step_cost.png`` under
``--out`` (default ``results/step_cost/``).

Examples::

  nice -n 10 python -m benchmarks.step_cost --quick
  nice -n 10 python -m benchmarks.step_cost --sizes 1e6,1e7 --leaves 200
  nice -n 10 python -m benchmarks.step_cost --sizes 1e8 --leaves 0 --no-model
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import random
import re
import sys
import time
from typing import Any, Callable

import numpy as np

# Hand count of parameter-size buffers each optimizer must read + write per
# step (float32, 4 bytes each). See BUILD_NOTES.md section 9 for the derivation.
#   sgd+momentum: read g, v; write v, u.
#   adam: read g, m, v; write m, v, u.
#   yellowfin: the clip factor needs ||g||^2 before any element of m or v can
#     be written, so g is read twice: pass 1 reads g and m (||g||^2 and
#     <m, g>, from which ||m_new||^2 follows algebraically), pass 2 reads g, m,
#     v and writes m, v, u.
#   yellowfin_auto along rms_direction(): pass 1 also reads the second
#     moment s (for d = g / sqrt(s_new)) and writes s_new; pass 2 reads it
#     again: 11.
MIN_BUFFERS = {'sgd_momentum': 4, 'adam': 6, 'yellowfin': 8,
               'yellowfin_auto': 8, 'yellowfin_auto_rms': 11,
               'closed_loop': 8, 'yellowfin_floor': 8, 'stream': 3}


def yellowfin_floor():
  """YellowFin's per-step data flow without its tuner: the structural limit.

  The three global sums over the gradient g and its EMA m that the tuner
  needs (``||g||^2``, ``<m, g>``, ``||m||^2``, reduced exactly as the library
  reduces them), then m, the momentum trace v and the update from scalars
  that depend on all three sums, so that, as in YellowFin, nothing
  parameter-size can be written before every sum is done. Its time over
  Adam's is what any YellowFin costs on this backend; ``yellowfin`` over it
  is what the tuner, the statistics and the NaN guard add.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from yellowfin_optax import _yellowfin

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return zeros(), zeros()

  def update(g, state, params=None):
    del params
    m, v = state
    gg, gm, mm = _yellowfin.tree_dots((g, m), [(0, 0), (0, 1), (1, 1)])
    total = gg + jnp.abs(gm) + mm
    clip = jax.lax.rsqrt(1.0 + total)
    lr = 1.0 / (1.0 + total)
    mu = total / (1.0 + total)
    m = jax.tree.map(lambda m, g: 0.999 * m + 0.001 * clip * g, m, g)
    v = jax.tree.map(lambda v, g: mu * v + clip * g, v, g)
    return jax.tree.map(lambda v: -lr * v, v), (m, v)

  return optax.GradientTransformation(init, update)


def _load_variant(path: str | None):
  """Imports ``yellowfin_optax`` (from ``path`` if given) as a fresh module."""
  saved = {k: v for k, v in sys.modules.items()
           if k == 'yellowfin_optax' or k.startswith('yellowfin_optax.')}
  for k in saved:
    del sys.modules[k]
  if path is not None:
    sys.path.insert(0, path)
  try:
    mod = importlib.import_module('yellowfin_optax')
  finally:
    if path is not None:
      sys.path.remove(path)
    for k in [k for k in sys.modules
              if k == 'yellowfin_optax' or k.startswith('yellowfin_optax.')]:
      del sys.modules[k]
    sys.modules.update(saved)
  return mod


def make_optimizers(compare: list[str], closed_loop: bool = True):
  import optax
  import yellowfin_optax as yf
  opts = {
      'adam': optax.adam(1e-3),
      'sgd_momentum': optax.sgd(1e-2, momentum=0.9),
      'yellowfin': yf.yellowfin(),
      'yellowfin_auto': yf.yellowfin_auto(),
      'yellowfin_auto_rms': yf.yellowfin_auto(direction=yf.rms_direction()),
      'yellowfin_floor': yellowfin_floor(),
  }
  if closed_loop and hasattr(yf, 'closed_loop_yellowfin'):
    opts['closed_loop'] = yf.closed_loop_yellowfin()
  for path in compare:
    mod = _load_variant(path)
    label = pathlib.Path(path).name or path
    opts[f'yellowfin@{label}'] = mod.yellowfin()
    if closed_loop and hasattr(mod, 'closed_loop_yellowfin'):
      opts[f'closed_loop@{label}'] = mod.closed_loop_yellowfin()
  return opts


def mixed_shapes(total: int, leaves: int, seed: int = 0) -> list[tuple[int, ...]]:
  """``leaves`` shapes (matrices, conv kernels, biases, scales) ~ ``total``."""
  rng = np.random.default_rng(seed)
  n_big = leaves // 2
  # Half the leaves are small vectors (biases, norm scales: 64..4096).
  small = [int(rng.integers(64, 4097)) for _ in range(leaves - n_big)]
  budget = max(total - sum(small), n_big)
  weights = rng.lognormal(0.0, 0.8, n_big)
  sizes = np.maximum((weights / weights.sum() * budget).astype(int), 16)
  shapes: list[tuple[int, ...]] = []
  for i, n in enumerate(sizes):
    if i % 3 == 0:  # conv kernel 3x3xCxC'
      c = max(int(np.sqrt(n / 9)), 1)
      shapes.append((3, 3, c, max(n // (9 * c), 1)))
    else:  # dense kernel
      a = max(int(np.sqrt(n)) // 2, 1)
      shapes.append((a, max(n // a, 1)))
  shapes += [(n,) for n in small]
  order = rng.permutation(len(shapes))
  return [shapes[i] for i in order]


def _fresh(tree):
  """Copies every leaf: init may reuse one buffer for several fields, which
  donation rejects."""
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def tree_bytes(tree) -> int:
  import jax
  return int(sum(np.prod(x.shape) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------- HLO passes
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$')
_SHAPE = re.compile(r'(pred|s8|s16|s32|s64|u8|u32|u64|bf16|f16|f32|f64)\[([\d,]*)\]')
_SKIP_OPS = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
             'copy-start', 'copy-done', 'after-all'}


def _big_count(shape_text: str, threshold: int) -> int:
  n = 0
  for _, dims in _SHAPE.findall(shape_text):
    size = int(np.prod([int(d) for d in dims.split(',') if d])) if dims else 1
    if size >= threshold:
      n += 1
  return n


def hlo_passes(hlo: str, threshold: int) -> dict[str, Any]:
  """Counts kernels and big-buffer reads/writes in the ENTRY computation.

  A *kernel* is a top-level instruction that is not bookkeeping (fusion,
  reduce, copy, ...). Buffers with at least ``threshold`` elements count as
  parameter-size.
  """
  entry = hlo[hlo.index('ENTRY'):]
  entry = entry[:entry.index('\n}')]
  shapes: dict[str, str] = {}
  kernels, big_kernels, reads, writes, copies = 0, 0, 0, 0, 0
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name.lstrip('%')] = shape
    if op in _SKIP_OPS:
      continue
    operands = re.findall(r'%([\w.\-]+)', rest.split('), ')[0] + ')')
    r = sum(_big_count(shapes.get(o, ''), threshold) for o in operands)
    w = _big_count(shape, threshold)
    kernels += 1
    if r or w:
      big_kernels += 1
      copies += op == 'copy'
    reads += r
    writes += w
  return {'kernels': kernels, 'big_kernels': big_kernels,
          'big_reads': reads, 'big_writes': writes, 'big_copies': copies}


# ---------------------------------------------------------------- timing
class Case:
  """One compiled function with the argument it threads through calls."""

  def __init__(self, name: str, fn: Callable, args: tuple, donate: tuple,
               threshold: int,
               next_args: Callable[[list, Any], list] | None = None):
    import jax
    self.name = name
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    t2 = time.perf_counter()
    self.trace_s, self.compile_s = t1 - t0, t2 - t1
    try:
      ca = self.compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      self.xla_bytes = float(ca.get('bytes accessed', float('nan')))
      self.xla_flops = float(ca.get('flops', float('nan')))
    except Exception:  # pylint: disable=broad-except
      self.xla_bytes = self.xla_flops = float('nan')
    self.hlo = self.compiled.as_text()
    self.passes = hlo_passes(self.hlo, threshold)
    self.args = list(args)
    self.next_args = next_args
    self.times: list[float] = []
    t3 = time.perf_counter()
    self.call()  # first call (warm-up, excluded)
    self.first_call_s = time.perf_counter() - t3

  def call(self) -> float:
    import jax
    t0 = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    if self.next_args is not None:  # thread donated outputs to the next call
      self.args = self.next_args(self.args, out)
    return dt


def run_rounds(cases: list[Case], reps: int, desc: str, calls_per_round: int = 1):
  from tqdm import tqdm
  order = list(cases)
  for _ in tqdm(range(reps), desc=desc, leave=False):
    random.shuffle(order)
    for c in order:
      for _ in range(calls_per_round):
        c.times.append(c.call())


def summarize(c: Case) -> dict[str, float]:
  t = np.asarray(c.times)
  return {'median_s': float(np.median(t)),
          'p25_s': float(np.percentile(t, 25)),
          'p75_s': float(np.percentile(t, 75)),
          'min_s': float(t.min()), 'n': int(t.size)}


def bench_update(opts, shapes, reps, label, compare_hlo_dir=None):
  """Times every optimizer's update on gradients with the given leaf shapes."""
  import jax
  import jax.numpy as jnp
  import optax
  n_params = int(sum(np.prod(s) for s in shapes))
  key = jax.random.PRNGKey(0)
  keys = jax.random.split(key, len(shapes))
  grads = [1e-2 * jax.random.normal(k, s, jnp.float32)
           for k, s in zip(keys, shapes)]
  grads = grads[0] if len(grads) == 1 else grads
  threshold = max(min(int(np.prod(s)) for s in shapes), 2)
  threshold = min(threshold, max(n_params // 4, 2))
  cases, extra = [], {}
  for name, tx in opts.items():
    state = _fresh(tx.init(grads))
    extra[name] = {'state_bytes': tree_bytes(state)}
    # (state, updates), state first: jit pairs donated inputs with outputs of
    # the same shape in output order, so with updates first the updates
    # take the first state buffer and every state buffer after it lands in
    # its neighbour's slot, which costs copies (2 for Adam at one leaf) that
    # a train step returning (params, state) does not pay.
    # value=: the loss, which yellowfin_auto needs and the others ignore.
    fn = lambda g, s, tx=optax.with_extra_args_support(tx): tx.update(
        g, s, value=1.0)[::-1]
    cases.append(Case(name, fn, (grads, state), (1,), threshold,
                      lambda a, out: [a[0], out[0]]))
  # Streaming reference: a + c * b over the same leaves (2 reads, 1 write).
  b = jax.tree.map(lambda x: x + 1.0, grads)
  cases.append(Case('stream', lambda a, b: (jax.tree.map(
      lambda x, y: x + 0.5 * y, a, b), None), (grads, b), (), threshold))
  if compare_hlo_dir:
    os.makedirs(compare_hlo_dir, exist_ok=True)
    for c in cases:
      safe = re.sub(r"[^\w.@-]", "_", f"{label}_{c.name}")
      pathlib.Path(compare_hlo_dir, f"{safe}.hlo.txt").write_text(c.hlo)
  calls = 1 if n_params >= 5_000_000 else 5
  run_rounds(cases, reps, f'{label}', calls)
  param_bytes = 4 * n_params
  rows = []
  stream = summarize(cases[-1])
  stream_bw = MIN_BUFFERS['stream'] * param_bytes / stream['median_s']
  adam_med = None
  for c in cases:
    s = summarize(c)
    if c.name == 'adam':
      adam_med = s['median_s']
  adam_compile = next(c.compile_s for c in cases if c.name == 'adam')
  for c in cases:
    s = summarize(c)
    base = c.name.split('@')[0]
    min_bytes = MIN_BUFFERS.get(base, float('nan')) * param_bytes
    row = {
        'case': label, 'optimizer': c.name, 'n_params': n_params,
        'n_leaves': len(shapes), **s,
        'ratio_to_adam': s['median_s'] / adam_med,
        'compile_s': c.compile_s, 'trace_s': c.trace_s,
        'first_call_s': c.first_call_s,
        'compile_ratio_to_adam': c.compile_s / adam_compile,
        'state_bytes': extra.get(c.name, {}).get('state_bytes', 0),
        'state_over_params': extra.get(c.name, {}).get('state_bytes', 0)
                             / param_bytes,
        'xla_bytes_accessed': c.xla_bytes,
        'xla_bytes_over_params': c.xla_bytes / param_bytes,
        'min_bytes': min_bytes,
        'min_buffers': min_bytes / param_bytes,
        'achieved_GBps': min_bytes / s['median_s'] / 1e9,
        'stream_GBps': stream_bw / 1e9,
        'floor_s': min_bytes / stream_bw,
        'time_over_floor': s['median_s'] / (min_bytes / stream_bw),
        **c.passes,
    }
    rows.append(row)
  return rows


def bench_model(opts, reps, batch=128):
  """Full train step of a Flax MLP: forward + backward + update."""
  import jax
  import optax
  from flax import linen as nn

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      for width in (1024, 1024):
        x = nn.relu(nn.Dense(width)(x))
      return nn.Dense(10)(x)

  model = MLP()
  key = jax.random.PRNGKey(1)
  x = jax.random.normal(key, (batch, 784))
  y = jax.random.randint(key, (batch,), 0, 10)
  params = model.init(key, x)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  threshold = 1024 * 10

  def loss_fn(p):
    logits = model.apply(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  cases = []
  for name, tx in opts.items():
    tx = optax.with_extra_args_support(tx)  # value=: for yellowfin_auto

    def step(p, s, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p, value=loss)
      return (optax.apply_updates(p, u), s), loss
    state = _fresh(tx.init(params))
    fn = lambda carry, step=step: step(*carry)
    c = Case(f'train:{name}', fn, ((_fresh(params), state),), (0,), threshold,
             lambda a, out: [out[0]])
    cases.append(c)
  fwd = Case('train:forward+backward only',
             lambda p: jax.value_and_grad(loss_fn)(p), (params,), (),
             threshold)
  cases.append(fwd)
  run_rounds(cases, reps, 'flax mlp', 2)
  rows = []
  fb = summarize(fwd)['median_s']
  adam_med = summarize(next(c for c in cases if c.name == 'train:adam'))[
      'median_s']
  for c in cases:
    s = summarize(c)
    rows.append({'case': f'flax MLP 784-1024-1024-10, batch {batch}',
                 'optimizer': c.name, 'n_params': int(n_params),
                 'n_leaves': len(jax.tree.leaves(params)), **s,
                 'ratio_to_adam': s['median_s'] / adam_med,
                 'optimizer_share': max(s['median_s'] - fb, 0.0) / s['median_s'],
                 'compile_s': c.compile_s})
  return rows


def _fmt_ms(s):
  return f'{1e3 * s:.3g}'


def markdown(rows, model_rows, meta) -> str:
  lines = [f'# Optimizer step cost ({meta["date"]})', '',
           f'`{meta["command"]}`', '',
           f'Device: {meta["device"]}; {meta["cpus"]} CPU cores (shared). '
           'Times are medians over interleaved rounds; [p25, p75] in brackets. '
           'state/params: optimizer state bytes over parameter bytes. '
           'min bufs: parameter-size buffers the optimizer must read + write '
           '(hand count); floor: min bufs at the measured streaming bandwidth '
           '(`a + 0.5 b`). XLA bytes: `cost_analysis()["bytes accessed"]` '
           'over parameter bytes. passes: top-level kernels touching a '
           'parameter-size buffer (reads / writes of such buffers); copies: '
           'those of them that only copy a buffer (XLA keeps a donated '
           'buffer\'s old value alive for a reader it cannot order before '
           'the in-place writer).', '',
           '| case | optimizer | median ms [p25, p75] | x Adam | compile s '
           '(x Adam) | state/params | min bufs | XLA bytes | passes (R/W) | '
           'copies | GB/s | x floor |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["case"]} | {r["optimizer"]} | {_fmt_ms(r["median_s"])} '
        f'[{_fmt_ms(r["p25_s"])}, {_fmt_ms(r["p75_s"])}] | '
        f'{r["ratio_to_adam"]:.2f} | {r["compile_s"]:.2f} '
        f'({r["compile_ratio_to_adam"]:.2f}) | {r["state_over_params"]:.2f} | '
        f'{r["min_buffers"]:.0f} | {r["xla_bytes_over_params"]:.1f} | '
        f'{r["big_kernels"]} ({r["big_reads"]}/{r["big_writes"]}) | '
        f'{r["big_copies"]} | {r["achieved_GBps"]:.1f} | {r["time_over_floor"]:.2f} |')
  if model_rows:
    lines += ['', '| model | train step | median ms [p25, p75] | x Adam | '
              'optimizer share | compile s |', '|---|---|---|---|---|---|']
    for r in model_rows:
      lines.append(
          f'| {r["case"]} ({r["n_params"]:,} params) | {r["optimizer"]} | '
          f'{_fmt_ms(r["median_s"])} [{_fmt_ms(r["p25_s"])}, '
          f'{_fmt_ms(r["p75_s"])}] | {r["ratio_to_adam"]:.2f} | '
          f'{100 * r["optimizer_share"]:.0f}% | {r["compile_s"]:.2f} |')
  return '\n'.join(lines) + '\n'


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  single = [r for r in rows if r['n_leaves'] == 1]
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for name in dict.fromkeys(r['optimizer'] for r in single):
    rs = sorted((r for r in single if r['optimizer'] == name),
                key=lambda r: r['n_params'])
    n = [r['n_params'] for r in rs]
    ax[0].loglog(n, [1e3 * r['median_s'] for r in rs], 'o-', label=name)
    if name != 'stream':
      ax[1].semilogx(n, [r['ratio_to_adam'] for r in rs], 'o-', label=name)
  ax[0].set_xlabel('parameters (one float32 leaf)')
  ax[0].set_ylabel('update time, ms (median)')
  ax[1].set_xlabel('parameters (one float32 leaf)')
  ax[1].set_ylabel('time / optax.adam time')
  ax[1].axhline(1.10, color='gray', ls='--', lw=0.8)
  for a in ax:
    a.grid(True, which='both', alpha=0.3)
  ax[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='1e6,1e7',
                 help='comma-separated single-leaf parameter counts')
  p.add_argument('--leaves', type=int, default=200,
                 help='also split --leaves-total over this many leaves (0: no)')
  p.add_argument('--leaves-total', type=float, default=1e7)
  p.add_argument('--reps', type=int, default=0,
                 help='interleaved rounds per case (0: by size)')
  p.add_argument('--no-model', action='store_true')
  p.add_argument('--quick', action='store_true', help='~1 minute smoke run')
  p.add_argument('--compare', action='append', default=[],
                 help='path holding another yellowfin_optax to time as well')
  p.add_argument('--no-closed-loop', action='store_true',
                 help='leave closed_loop_yellowfin out (it compiles slowly)')
  p.add_argument('--compare-closed-loop', action='store_true',
                 help='also time closed_loop_yellowfin of each --compare path')
  p.add_argument('--hlo', action='store_true',
                 help='also save the compiled HLO of every update under --out')
  p.add_argument('--out', default='results/step_cost')
  args = p.parse_args(argv)

  import jax
  sizes = [int(float(s)) for s in args.sizes.split(',') if s]
  if args.quick:
    sizes, args.leaves, args.leaves_total = [sizes[0] if sizes else 10**6], 10, 1e6
  opts = make_optimizers(args.compare, not args.no_closed_loop)
  if not args.compare_closed_loop:
    opts = {k: v for k, v in opts.items()
            if not (k.startswith('closed_loop@'))}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  hlo_dir = str(out / 'hlo') if args.hlo else None

  def reps_for(n):
    if args.reps:
      return args.reps
    if args.quick:
      return 15
    return 100 if n <= 2_000_000 else (30 if n <= 20_000_000 else 8)

  rows = []
  for n in sizes:
    rows += bench_update(opts, [(n,)], reps_for(n), f'{n:.0e} x 1 leaf',
                         hlo_dir)
  if args.leaves:
    shapes = mixed_shapes(int(args.leaves_total), args.leaves)
    total = int(sum(np.prod(s) for s in shapes))
    rows += bench_update(opts, shapes, reps_for(total),
                         f'{total:.2e} x {args.leaves} leaves', hlo_dir)
  model_rows = [] if args.no_model else bench_model(
      opts, 10 if args.quick else 40)
  meta = {'date': time.strftime('%Y-%m-%d %H:%M'),
          'command': 'python -m benchmarks.step_cost ' + ' '.join(
              argv if argv is not None else sys.argv[1:]),
          'device': str(jax.devices()[0].device_kind),
          'cpus': os.cpu_count(), 'jax': jax.__version__}
  md = markdown(rows, model_rows, meta)
  print(md)
  (out / 'step_cost.md').write_text(md)
  (out / 'step_cost.json').write_text(json.dumps(
      {'meta': meta, 'rows': rows, 'model_rows': model_rows}, indent=1))
  plot(rows, out / 'step_cost.png')
  print(f'wrote {out}/step_cost.{{md,json,png}}')


if __name__ == '__main__':
  main()
