"""SAE codes over the evaluation set, and the feature statistics folded from them.

One model forward per evaluation batch serves every SAE of a checkpoint (all hooks, seed
variants); each SAE's top-k codes come back to the host once, feed its statistics, and are
returned for the second pass (strong firings, example draw) and the overlap analysis. A last
pass collects the paper's examples (paper_examples.py): it re-runs ``acts_fn`` on the batches
that hold a chosen sequence.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sae_jax.analysis.config import AnalysisConfig
from sae_jax.analysis.evalset import EvalSet
from sae_jax.analysis.paper_examples import paper_examples
from sae_jax.analysis.stats import FeatureStats, add_strong_firings, collect_stats_many


def feature_stats(sae, evalset: EvalSet, acts_fn: Callable, cfg: AnalysisConfig = AnalysisConfig(),
                  log_fn: Callable[[str], None] | None = None
                  ) -> tuple[FeatureStats, np.ndarray, np.ndarray]:
  """Statistics of ``sae`` over ``evalset`` plus its codes (values, indices) [N, k].

  ``acts_fn(ids [b, T]) -> [b, T, d_in]`` gives the hook's activations (a model forward, or
  anything else in tests); rows are the evaluation set's counted tokens in order.
  """
  return feature_stats_many({"": (sae, "")}, evalset, lambda ids: {"": acts_fn(ids)}, cfg,
                            log_fn)[""]


def feature_stats_many(saes: dict, evalset: EvalSet, acts_fn: Callable,
                       cfg: AnalysisConfig = AnalysisConfig(),
                       log_fn: Callable[[str], None] | None = None) -> dict:
  """{name: (FeatureStats, values [N, k], indices [N, k])} of several SAEs ({name: (sae, hook)})
  over one pass of ``evalset``; ``acts_fn(ids [b, T]) -> {hook: [b, T, d]}`` runs once per
  batch."""
  def batches():
    for s, ids, mask in evalset.batches(cfg.seqs_per_batch):
      acts = acts_fn(ids)
      rows, cols = np.nonzero(mask)
      yield ({h: np.asarray(a, np.float32)[rows, cols] for h, a in acts.items()},
             ids[rows, cols], rows + s, cols.astype(np.int32),
             evalset.language[s:s + len(ids)][rows, cols])

  codes = {name: ([], []) for name in saes}

  def keep(name, v, i):
    codes[name][0].append(v.astype(np.float32))
    codes[name][1].append(i.astype(np.int32))

  found = collect_stats_many(saes, batches(), len(evalset.token_text), cfg.n_examples,
                             log_fn=log_fn, total_tokens=evalset.n_tokens, on_codes=keep)
  seq, pos = np.nonzero(evalset.mask)  # the codes' rows, in order
  out = {}
  for name, st in found.items():
    values, indices = np.concatenate(codes[name][0]), np.concatenate(codes[name][1])
    add_strong_firings(st, values, indices, evalset.ids[evalset.mask],
                       evalset.language[evalset.mask], seq, pos.astype(np.int32),
                       cfg.labels.example_fraction, seed=cfg.sample_seed)
    out[name] = (st, values, indices)
  collected = paper_examples(saes, {name: o[1:] for name, o in out.items()},
                             {name: o[0].max_pre for name, o in out.items()}, evalset, acts_fn,
                             cfg.seqs_per_batch, cfg.n_examples, cfg.labels.example_fraction)
  for name, (seq_, acts, top) in collected.items():
    st = out[name][0]
    st.paper_seq, st.paper_acts, st.paper_max = seq_, acts, top
  return out
