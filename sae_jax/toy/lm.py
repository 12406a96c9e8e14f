"""Train the toy world's target model (our Llama port) and save real training checkpoints.

Checkpoints are Hugging Face directories (config.json, model.safetensors, tokenizer files), one
per revision ``step{N}`` at log-spaced steps including 0, so the loader that reads real
checkpoints reads these too. Next to them: ``eval.jsonl`` (the held-out documents with their
per-token ground truth) and ``world.json`` (configs, the world's entropy, each checkpoint's
held-out loss).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from sae_jax import paths, store
from sae_jax.evals import next_token_nll
from sae_jax.models.base import TransformerConfig, forward, param_name, with_params
from sae_jax.models.hf import abstract_model
from sae_jax.toy.world import PAD, World, WorldConfig


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The toy target model and its training run."""

  # Sized for the default trace (model, SAEs and analysis) within 10 minutes on 2 CPU cores.
  d_model: int = 64
  n_layers: int = 3
  n_heads: int = 4
  d_mlp: int = 192
  batch_size: int = 32
  steps: int = 300
  lr: float = 5e-3
  warmup_steps: int = 40
  weight_decay: float = 0.01
  train_docs: int = 9_600  # steps x batch_size: every document seen once
  eval_docs: int = 1_000
  seed: int = 0


TINY_WORLD = WorldConfig(n_nouns=42, n_adjectives=6)
TINY_LM = LMConfig(d_model=64, n_layers=2, n_heads=4, d_mlp=160, steps=400, train_docs=30_000,
                   eval_docs=500, lr=5e-3, warmup_steps=40)


def checkpoint_steps(total: int) -> list[int]:
  """0, then 3-10 log spacing up to ``total``, and ``total``. No step 1: the first update runs
  at learning rate 0 (the warm-up starts there), so step 1 would be step 0 again."""
  steps = {0, total}
  k = 1
  while k < total:
    steps.update(s for s in (k, 3 * k) if 1 < s < total)
    k *= 10
  return sorted(steps)


def model_config(world: World, cfg: LMConfig) -> TransformerConfig:
  return TransformerConfig(
      family="llama", model_type="llama", vocab_size=len(world.vocab), d_model=cfg.d_model,
      n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
      head_dim=cfg.d_model // cfg.n_heads, d_mlp=cfg.d_mlp, norm_eps=1e-5, rope_theta=10000.0,
      rotary_dim=cfg.d_model // cfg.n_heads, bos_token_id=world.word_index["<bos>"])


def hf_config(mc: TransformerConfig, world: World, max_len: int) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": mc.vocab_size, "hidden_size": mc.d_model, "intermediate_size": mc.d_mlp,
          "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads,
          "num_key_value_heads": mc.n_kv_heads, "head_dim": mc.head_dim, "hidden_act": "silu",
          "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta,
          "max_position_embeddings": max(64, max_len), "tie_word_embeddings": False,
          "attention_bias": False, "mlp_bias": False, "bos_token_id": world.word_index["<bos>"],
          "pad_token_id": world.word_index[PAD], "eos_token_id": None, "torch_dtype": "float32"}


def init_params(mc: TransformerConfig, key) -> dict:
  """Checkpoint name -> initial array (the module's names, in sorted order)."""
  shapes = {param_name(p): v.shape for p, v in nnx.to_flat_state(abstract_model(mc)[1])}
  params = {}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    if name.endswith("norm.weight"):
      params[name] = jnp.ones(shape, jnp.float32)
    else:
      params[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
  return params


def encode(world: World, docs, length: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, length] token ids (padded) and 0/1 mask."""
  ids = np.full((len(docs), length), world.word_index[PAD], np.int32)
  mask = np.zeros((len(docs), length), np.int32)
  for r, d in enumerate(docs):
    t = [world.word_index[w] for w in d.tokens][:length]
    ids[r, :len(t)], mask[r, :len(t)] = t, 1
  return ids, mask


def _loss(params, mc, ids, mask):
  graphdef, template = abstract_model(mc)
  state = with_params(template, params)  # the flat names -> the module's state (no copy)
  _, logits = forward(graphdef, state, ids, mask, (), (), True, jnp.float32)
  total, count, _, _ = next_token_nll(logits, ids, mask)
  return total / count


def save_checkpoint(path: Path, params: dict, mc: TransformerConfig, world: World,
                    max_len: int, info: dict) -> None:
  """A Hugging Face checkpoint directory, written atomically."""
  from safetensors.numpy import save_file
  with store.atomic_dir(path) as tmp:
    save_file({k: np.asarray(v, np.float32) for k, v in params.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    store.atomic_write_json(tmp / "config.json", {**hf_config(mc, world, max_len),
                                                  "sae_jax_toy": info})
    world.tokenizer().save_pretrained(tmp)


def train_toy_lm(outdir: str | Path, world_cfg: WorldConfig = WorldConfig(),
                 cfg: LMConfig = LMConfig(),
                 log_fn: Callable[[str], None] = logging.info) -> dict:
  """Generate the world, train the toy LM, save checkpoints ``step{N}``; returns world.json."""
  outdir = paths.as_path(outdir)
  done = outdir / "world.json"
  if done.exists():
    log_fn(f"{outdir} already holds a trained toy world; reusing it")
    return store.read_json(done)
  world = World(world_cfg)
  length = world.max_doc_tokens
  t0 = time.perf_counter()
  train = world.documents(cfg.train_docs, seed=1)
  held = world.documents(cfg.eval_docs, seed=2)
  train_ids, train_mask = encode(world, train, length)
  eval_ids, eval_mask = encode(world, held, length)
  entropy = world.entropy(held)
  log_fn(f"toy world: {len(world.concepts)} concepts, {len(world.vocab)} words, "
         f"{len(train)} training documents, entropy {entropy:.4f} nats/token "
         f"({time.perf_counter() - t0:.1f}s)")
  mc = model_config(world, cfg)
  params = init_params(mc, jax.random.key(cfg.seed))
  opt_state, step = _train_step(params, mc, cfg)
  eval_loss = jax.jit(_loss, static_argnums=1)
  save_at = checkpoint_steps(cfg.steps)
  checkpoints = {}
  rng = np.random.default_rng([cfg.seed, 3])
  perm = rng.permutation(len(train))
  outdir.mkdir(parents=True, exist_ok=True)
  t0, loss = time.perf_counter(), float("nan")
  for s in range(cfg.steps + 1):
    if s in save_at:
      ev = float(eval_loss(params, mc, eval_ids, eval_mask))
      label = f"step{s}"
      save_checkpoint(outdir / label, params, mc, world, length,
                      {"step": s, "train_loss": loss, "eval_loss": ev})
      checkpoints[label] = {"step": s, "eval_loss": ev}
      log_fn(f"step {s}/{cfg.steps} eval loss {ev:.4f} (world entropy {entropy:.4f}) "
             f"{time.perf_counter() - t0:.0f}s -> {label}")
    if s == cfg.steps:
      break
    start = (s * cfg.batch_size) % (len(train) - cfg.batch_size)
    idx = np.sort(perm[start:start + cfg.batch_size])
    params, opt_state, loss_arr = step(params, opt_state, train_ids[idx], train_mask[idx])
    if (s + 1) % 100 == 0:
      loss = float(loss_arr)
  store.atomic_write_text(outdir / "eval.jsonl",
                          "".join(json.dumps(d.to_json(), ensure_ascii=False) + "\n"
                                  for d in held))
  summary = {"world": dataclasses.asdict(world_cfg), "lm": dataclasses.asdict(cfg),
             "entropy_nats_per_token": entropy, "checkpoints": checkpoints,
             "revisions": list(checkpoints)}
  store.atomic_write_json(done, summary)  # written last: its presence means "complete"
  return summary


def _train_step(params, mc: TransformerConfig, cfg: LMConfig):
  """AdamW with warm-up and cosine decay, gradient clipping: (initial opt state, jitted step)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                                max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=cfg.weight_decay))

  @jax.jit
  def step(params, opt_state, ids, mask):
    loss, grads = jax.value_and_grad(_loss)(params, mc, ids, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx.init(params), step
