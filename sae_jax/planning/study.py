"""What a trace is made of, from its config alone: the model's shapes (no weights, no
downloads) and how many steps of each compiled function the whole study runs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from sae_jax.errors import CheckpointError, ConfigError, SaeJaxError
from sae_jax.models.base import TransformerConfig
from sae_jax.models.hf import FAMILIES, read_config, resolve
from sae_jax.models.hooks import parse_hook
from sae_jax.toy.lm import TINY_LM, TINY_WORLD, LMConfig, checkpoint_steps, model_config
from sae_jax.toy.world import World, WorldConfig
from sae_jax.trace_config import TraceConfig

# The config.json fields the ports read, as published on the hub (so a study can be planned
# before anything is downloaded). Other models: a local directory or --model_config.
PUBLISHED_CONFIGS = {
    "llm-jp/llm-jp-3-1.8b": dict(
        model_type="llama", vocab_size=99584, hidden_size=2048, intermediate_size=7168,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1),
    "EleutherAI/pythia-160m": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, rotary_pct=0.25,
        use_parallel_residual=True, layer_norm_eps=1e-5, bos_token_id=0),
    "EleutherAI/pythia-1.4b": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=24, num_attention_heads=16, rotary_pct=0.25,
        use_parallel_residual=True, layer_norm_eps=1e-5, bos_token_id=0),
}


def model_shapes(cfg: TraceConfig, model_config_path: str | None = None
                 ) -> tuple[object, TransformerConfig]:
  """(family module, TransformerConfig) of the trace's model, without its weights.

  From, in order: ``model_config_path`` (a config.json or its directory), the toy world's
  sizes, a local model directory, the published configs above.
  """
  try:
    if model_config_path:
      path = Path(model_config_path)
      return read_config(path.parent if path.name == "config.json" else path)
    if cfg.toy:
      world_cfg, lm = (TINY_WORLD, TINY_LM) if cfg.toy_size == "tiny" else (WorldConfig(),
                                                                          LMConfig())
      mc = model_config(World(world_cfg), lm)
      return FAMILIES[mc.model_type], mc
    if Path(cfg.model).is_dir():
      return read_config(resolve(cfg.model, (cfg.revisions or (None,))[0]))
    if cfg.model in PUBLISHED_CONFIGS:
      d = PUBLISHED_CONFIGS[cfg.model]
      return FAMILIES[d["model_type"]], FAMILIES[d["model_type"]].config_from_hf(d)
  except (CheckpointError, ConfigError) as e:
    raise ConfigError(f"cannot plan model {cfg.model!r}: {e}") from None
  except SaeJaxError as e:  # an architecture the ports do not implement
    raise ConfigError(f"the port cannot plan model {cfg.model!r}: {e}") from None
  raise ConfigError(f"cannot plan model {cfg.model!r} without downloading it: not a local "
                    f"directory and not among the published shapes {sorted(PUBLISHED_CONFIGS)}; "
                    "pass --model_config=<its config.json>")


def check_hooks(cfg: TraceConfig, mc: TransformerConfig) -> None:
  for hook in cfg.hooks:
    parse_hook(hook, mc.n_layers)


# The spliced evaluation runs three forwards per batch: clean, SAE spliced in, site ablated.
EVAL_FORWARDS = 3


@dataclasses.dataclass(frozen=True)
class StudyCounts:
  """How many times the trace runs each compiled function."""

  checkpoints: int
  hooks: int
  saes: int
  tokens_per_sae: int
  forward_steps: int
  sae_steps: int
  eval_steps: int
  rounds: int  # on-device mixing rounds: one per buffer_batches forwards

  def steps(self, name: str) -> int:
    return {"forward": self.forward_steps, "mix": self.rounds, "sae_step": self.sae_steps,
            "eval": self.eval_steps}[name]


def _checkpoints(cfg: TraceConfig) -> int:
  if cfg.revisions:
    return len(cfg.revisions)
  if cfg.toy:  # the toy run saves these checkpoints
    return len(checkpoint_steps((TINY_LM if cfg.toy_size == "tiny" else LMConfig()).steps))
  if Path(cfg.model).is_dir():
    return max(1, sum(1 for p in Path(cfg.model).iterdir() if (p / "config.json").exists()))
  raise ConfigError(f"revisions is empty and {cfg.model!r} is not a local directory; list the "
                    "revisions to plan")


def study_counts(cfg: TraceConfig, rows_per_forward: int) -> StudyCounts:
  """Steps of the forward (one per checkpoint feeds every hook's SAE), of the SAE step and of
  the spliced evaluation, over the whole trace (seed-baseline SAEs included)."""
  n_ckpt = _checkpoints(cfg)
  seeded = min(len(set(cfg.seed_baseline)), n_ckpt) if cfg.baseline_seeds else 0
  saes = len(cfg.hooks) * (n_ckpt + seeded * cfg.baseline_seeds)
  tokens = cfg.train.total_tokens
  if tokens is None:
    if not cfg.data.max_docs:
      raise ConfigError("train.total_tokens and data.max_docs are both unset: the planner "
                        "cannot tell how many tokens the trace trains on; set total_tokens")
    tokens = cfg.data.max_docs * max(cfg.data.ctx_len - 1, 1)
  forward = math.ceil((tokens + cfg.train.eval_tokens) / max(rows_per_forward, 1))
  return StudyCounts(
      checkpoints=n_ckpt, hooks=len(cfg.hooks), saes=saes, tokens_per_sae=int(tokens),
      forward_steps=n_ckpt * forward, sae_steps=saes * math.ceil(tokens / cfg.train.batch_size),
      eval_steps=saes * cfg.outputs.eval_batches * EVAL_FORWARDS,
      rounds=n_ckpt * math.ceil(forward / cfg.data.buffer_batches))
