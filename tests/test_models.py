"""Model ports against Hugging Face PyTorch on tiny random-weight models saved locally."""

import gc
import json
import shutil
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

import sae_jax as sj
from sae_jax.errors import CheckpointError, ConfigError, UnsupportedModelError
from sae_jax.models import base, load_model
from sae_jax.models.hf import abstract_model, read_config
from sae_jax.models.hooks import parse_hook

TOL = 1e-4  # float32, fixed up front
V, T, B = 97, 11, 3


def _llama_cfg(**kw):
  base = dict(vocab_size=V, hidden_size=60, intermediate_size=86, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
  base.update(kw)
  return base


VARIANTS = {
    "llama_gqa": (transformers.LlamaConfig, _llama_cfg()),
    "llama_tied_mha": (transformers.LlamaConfig, _llama_cfg(num_key_value_heads=6,
                                                            tie_word_embeddings=True)),
    "llama3_rope_scaling": (transformers.LlamaConfig, _llama_cfg(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_biases": (transformers.LlamaConfig, _llama_cfg(attention_bias=True, mlp_bias=True)),
    "qwen2": (transformers.Qwen2Config, _llama_cfg()),
    "mistral_window": (transformers.MistralConfig, _llama_cfg(sliding_window=4)),
    "neox_parallel": (transformers.GPTNeoXConfig, dict(
        vocab_size=V, hidden_size=56, intermediate_size=94, num_hidden_layers=3,
        num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
        max_position_embeddings=64)),
    "neox_sequential_full_rotary": (transformers.GPTNeoXConfig, dict(
        vocab_size=V, hidden_size=56, intermediate_size=94, num_hidden_layers=3,
        num_attention_heads=4, rotary_pct=1.0, use_parallel_residual=False,
        max_position_embeddings=64, hidden_act="gelu_new")),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=V, n_embd=52, n_layer=3, n_head=4,
                                           n_positions=32, n_inner=74)),
}


# Not in the parity matrix: heads, key/value heads and MLP width that a 4-way "model" axis splits.
TENSOR_PARALLEL = (transformers.LlamaConfig, _llama_cfg(hidden_size=64, intermediate_size=96,
                                                        num_attention_heads=8,
                                                        num_key_value_heads=4,
                                                        tie_word_embeddings=True))


def _save(tmp_path_factory, name):
  cls, kw = TENSOR_PARALLEL if name == "llama_tp" else VARIANTS[name]
  torch.manual_seed(0)
  cfg = cls(**kw)
  cfg._attn_implementation = "eager"
  head = "LMHeadModel" if cls is transformers.GPT2Config else "ForCausalLM"
  model = getattr(transformers, cls.__name__.replace("Config", head))(cfg).eval()
  # Random non-trivial norms/biases so every parameter matters.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  d = tmp_path_factory.mktemp(name)
  model.save_pretrained(d)
  return model, d


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
  return request.param, *_save(tmp_path_factory, request.param)


def _torch_hooks(model, n_layers):
  """Capture HF's per-block input/output and attention/MLP outputs with forward hooks."""
  caught = {}
  layers = (model.model.layers if hasattr(model, "model") else
            model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.transformer.h)
  handles = []
  for i, layer in enumerate(layers):
    handles.append(layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: caught.__setitem__(f"resid_pre.{i}", args[0] if args else
                                                        kwargs["hidden_states"]),
        with_kwargs=True))
    handles.append(layer.register_forward_hook(
        lambda m, a, out, i=i: caught.__setitem__(
            f"resid_post.{i}", out[0] if isinstance(out, tuple) else out)))
    attn = (getattr(layer, "self_attn", None) or getattr(layer, "attention", None) or
            layer.attn)
    handles.append(attn.register_forward_hook(
        lambda m, a, out, i=i: caught.__setitem__(f"attn_out.{i}", out[0])))
    handles.append(layer.mlp.register_forward_hook(
        lambda m, a, out, i=i: caught.__setitem__(f"mlp_out.{i}", out)))
  return caught, handles


def test_hidden_states_and_logits_match_hf(saved):
  name, hf, path = saved
  ids = np.random.default_rng(0).integers(0, V, size=(B, T))
  ours = load_model(path)
  n = ours.cfg.n_layers
  hooks = [f"{k}.{i}" for i in range(n) for k in ("resid_pre", "resid_post", "attn_out",
                                                   "mlp_out")]
  caught, handles = _torch_hooks(hf, n)
  with torch.no_grad():
    ref_logits = hf(torch.tensor(ids)).logits.numpy()
  for h in handles:
    h.remove()
  acts = ours.activations(ids, hooks)
  for h in hooks:
    np.testing.assert_allclose(acts[h], caught[h].numpy(), rtol=TOL, atol=TOL, err_msg=f"{name} {h}")
  np.testing.assert_allclose(ours.logits(ids), ref_logits, rtol=TOL, atol=TOL, err_msg=name)


def test_padding_left_and_right_keeps_real_token_activations(saved):
  name, _, path = saved  # mistral_window too: the window counts real-token positions
  model = load_model(path)
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, V, size=n) for n in (T, 7, 4)]
  hook = "resid_post.2"
  solo = [np.asarray(model.activations(s[None], [hook])[hook][0]) for s in seqs]
  for side in ("left", "right"):
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for r, s in enumerate(seqs):
      sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
      ids[r, sl], mask[r, sl] = s, 1
    acts = np.asarray(model.activations(ids, [hook], attention_mask=mask)[hook])
    for r, s in enumerate(seqs):
      sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
      np.testing.assert_allclose(acts[r, sl], solo[r], rtol=TOL, atol=TOL, err_msg=f"{name} {side}")


def test_bfloat16_within_documented_bound(tmp_path_factory):
  hf, path = _save(tmp_path_factory, "llama_gqa")
  ids = np.random.default_rng(2).integers(0, V, size=(B, T))
  f32 = load_model(path).activations(ids, ["resid_post.2"])["resid_post.2"]
  bf16 = load_model(path, dtype="bfloat16").activations(ids, ["resid_post.2"])["resid_post.2"]
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert rel < 2e-2  # documented bound: bf16 keeps ~3 significant digits through 3 blocks


def test_stops_at_the_deepest_hook_and_splices(tmp_path_factory):
  hf, path = _save(tmp_path_factory, "llama_gqa")
  model = load_model(path)
  ids = np.random.default_rng(3).integers(0, V, size=(B, T))
  mask = np.ones_like(ids)
  # resid_post.0 needs block 0 only: the traced forward reads no weight of blocks 1 and 2 (nor
  # the unembedding) and gives what the full model gives.
  state = nnx.state(model)
  names = {id(v.get_value()): base.param_name(p) for p, v in nnx.to_flat_state(state)}
  names = [names[id(a)] for a in jax.tree.leaves(state)]
  graphdef = base.graphdef_of(type(model), model.cfg)
  run = lambda s: base.forward(graphdef, s, ids, mask, (parse_hook("resid_post.0"),), (), False,
                               jnp.float32)[0]
  jaxpr = jax.make_jaxpr(run)(state).jaxpr
  read = {v for e in jaxpr.eqns for v in e.invars if not hasattr(v, "val")}
  unread = {n for n, v in zip(names, jaxpr.invars) if v not in read}
  assert unread == {n for n in names if not n.startswith(("model.embed_tokens.", "model.layers.0."))}
  np.testing.assert_allclose(run(state)["resid_post.0"],  # eager vs jitted: rounding only
                             model.activations(ids, ["resid_post.0"])["resid_post.0"],
                             rtol=TOL, atol=TOL)
  # Splicing the identity changes nothing; zero-ablating mlp_out.1 matches HF with that MLP's
  # output zeroed by a forward hook.
  clean = model.logits(ids)
  same = model.logits(ids, splice={"resid_post.1": lambda x: x})
  np.testing.assert_array_equal(same, clean)
  ablated = model.logits(ids, splice={"mlp_out.1": jnp.zeros_like})
  handle = hf.model.layers[1].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  handle.remove()
  np.testing.assert_allclose(ablated, ref, rtol=TOL, atol=TOL)
  assert float(jnp.abs(ablated - clean).max()) > 1e-3  # the ablation is not a no-op here
  acts = model.activations(ids, ["resid_post.1", "blocks.1.hook_resid_post", "layers.1"])
  np.testing.assert_array_equal(acts["layers.1"], acts["resid_post.1"])
  np.testing.assert_array_equal(acts["blocks.1.hook_resid_post"], acts["resid_post.1"])


def test_the_model_is_an_nnx_module_named_as_the_checkpoint(tmp_path_factory):
  _, path = _save(tmp_path_factory, "gpt2")
  model = load_model(path)
  assert isinstance(model, nnx.Module) and type(model).__name__ == "GPT2LMHeadModel"
  graphdef, state = nnx.split(model)
  names = {base.param_name(p) for p, _ in nnx.to_flat_state(state)}
  assert names == set(load_file(str(path / "model.safetensors"))) - {
      k for k in load_file(str(path / "model.safetensors")) if k.endswith(".attn.bias")}
  w = model.transformer.h[1].attn.c_attn.weight
  assert w.get_metadata()["out_sharding"] == ("embed", "heads")  # logical names only
  ids = np.random.default_rng(7).integers(0, V, size=(1, T))
  again = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(again.logits(ids), model.logits(ids))


def test_sharded_load_on_2x4_mesh_equals_unsharded(tmp_path_factory):
  _, path = _save(tmp_path_factory, "llama_tp")
  ids = np.random.default_rng(4).integers(0, V, size=(4, T))
  mesh = sj.make_mesh(sj.MeshConfig(data=2, model=4))
  one = load_model(path)
  sharded = load_model(path, mesh=mesh)
  w = sharded.model.layers[0].self_attn.q_proj.weight.get_value()
  assert w.sharding.spec == jax.sharding.PartitionSpec("model", None)
  assert {s.data.shape for s in w.addressable_shards} == {(w.shape[0] // 4, w.shape[1])}
  vocab = sharded.model.embed_tokens.weight.get_value()  # 97 rows: replicated, as allowed
  assert vocab.sharding.spec == jax.sharding.PartitionSpec(None, None)
  np.testing.assert_allclose(sharded.logits(ids), one.logits(ids), rtol=TOL, atol=TOL)


def test_a_model_too_big_for_one_device_loads_and_runs_sharded(tmp_path):
  """A synthetic Llama whose weights exceed a per-device limit set here loads and runs on
  (data=2, model=4): every device holds under the limit, weights and forward alike."""
  hf_cfg = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
  (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
  _, cfg = read_config(tmp_path)
  _, abstract = abstract_model(cfg)
  rng = np.random.default_rng(8)
  save_file({base.param_name(p): (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
             for p, v in nnx.to_flat_state(abstract)}, str(tmp_path / "model.safetensors"))
  limit = 512 * 1024  # bytes per device
  whole = sum(a.size * 4 for a in jax.tree.leaves(abstract))
  assert whole > limit  # unsharded, one device would need more than it has
  model = load_model(tmp_path, mesh=sj.make_mesh(sj.MeshConfig(data=2, model=4)))
  per_device = {}
  for a in jax.tree.leaves(nnx.state(model)):
    for s in a.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
  assert len(per_device) == 8 and max(per_device.values()) < limit
  ids = rng.integers(0, 512, size=(2, 16))
  logits = model.logits(ids)
  assert logits.shape == (2, 16, 512) and bool(jnp.isfinite(logits).all())
  compiled = base._forward_jit.lower(base.Graph(type(model), cfg),
                                     jax.tree.leaves(nnx.state(model)), *model._inputs(ids, None),
                                     (), (), True, jnp.float32, ()).compile().memory_analysis()
  peak = (compiled.argument_size_in_bytes + compiled.output_size_in_bytes
          + compiled.temp_size_in_bytes)
  print(f"whole model {whole} B, limit {limit} B, per device: weights "
        f"{max(per_device.values())} B, forward peak {peak} B")
  assert peak < limit


def test_dropped_model_is_freed_and_checkpoints_share_one_compilation(tmp_path_factory, tmp_path):
  _, path = _save(tmp_path_factory, "llama_gqa")
  later = tmp_path / "later"  # a later checkpoint: same config, other weights
  shutil.copytree(path, later)
  tensors = load_file(str(later / "model.safetensors"))
  save_file({k: v * 1.5 for k, v in tensors.items()}, str(later / "model.safetensors"))
  ids = np.random.default_rng(5).integers(0, V, size=(B, T))

  def use_and_drop(p):
    model = load_model(p)
    model.activations(ids, ["resid_post.1"])
    logits = np.asarray(model.logits(ids))
    with jax.disable_jit():  # reference: the same forward run op by op on this model's params
      np.testing.assert_allclose(logits, model.logits(ids), rtol=TOL, atol=TOL)
    refs = [weakref.ref(model)] + [weakref.ref(a) for a in model.params.values()]
    return logits, refs

  first, refs = use_and_drop(path)
  gc.collect()
  assert [r for r in refs if r() is not None] == []  # the model and all its parameters are gone
  compiled = base._forward_jit._cache_size()
  second, refs = use_and_drop(later)
  gc.collect()
  assert [r for r in refs if r() is not None] == []
  assert base._forward_jit._cache_size() == compiled  # the later checkpoint reused both programs
  assert not np.allclose(second, first)  # ... with its own weights


def test_spliced_evaluation_keeps_no_sae_alive_and_compiles_once_per_config(tmp_path_factory):
  """The CE-loss evaluation splices an SAE into the forward: its weights go in as arguments, so
  two SAEs of one config share the compiled program and neither stays cached."""
  from sae_jax import evals
  from sae_jax.data.tokens import TokenBatch
  _, path = _save(tmp_path_factory, "llama_gqa")
  model = load_model(path)
  ids = np.random.default_rng(6).integers(0, V, size=(B, T))
  batch = TokenBatch(ids, np.ones_like(ids), ids * 0, ids * 0, ids * 0)
  cfg = sj.SAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, k=3)
  saes = [sj.SAE(cfg, sj.saes.registry.get("topk").init_params(jax.random.key(s), cfg),
                 sj.saes.registry.get("topk").init_buffers(cfg)) for s in (1, 2)]
  got = [evals.spliced_metrics(model, saes[0], "resid_post.0", [batch])]
  size = base._forward_jit._cache_size()
  got.append(evals.spliced_metrics(model, saes[1], "resid_post.0", [batch]))
  assert base._forward_jit._cache_size() == size  # the second SAE reused the first's program
  for sae, m in zip(saes, got):  # reference: the SAE's reconstruction spliced in op by op
    with jax.disable_jit():
      with_sae = model.logits(ids, splice={"resid_post.0": lambda x, sae=sae: sae.reconstruct(x)})
    s, n, _, _ = evals.next_token_nll(with_sae, jnp.asarray(ids), jnp.ones_like(ids))
    assert m["ce_sae"] == pytest.approx(float(s) / float(n), rel=1e-5)
  assert got[0]["ce_sae"] != got[1]["ce_sae"]
  refs = [weakref.ref(a) for sae in saes for a in sae.params.values()]
  del saes, sae, got
  gc.collect()
  assert [r for r in refs if r() is not None] == []


FULL_SIZE = {
    "llm-jp-3-1.8b": dict(model_type="llama", vocab_size=99584, hidden_size=2048,
                          intermediate_size=7168, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=16, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "pythia-1.4b": dict(model_type="gpt_neox", vocab_size=50304, hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                        rotary_pct=0.25, use_parallel_residual=True),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rope_theta=500000.0),
}


# Published totals (Meta's Llama 3 8B; Pythia paper, Table 1) and, for LLM-jp-3 1.8B, the
# closed form: untied embeddings 2*V*D + 24 layers * (4*D^2 attention + 3*D*F MLP + 2*D norms)
# + D final norm.
FULL_SIZE_PARAMS = {"llama-3-8b": 8_030_261_248, "pythia-1.4b": 1_414_647_808,
                    "llm-jp-3-1.8b": 2 * 99584 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 * 7168
                                                             + 2 * 2048) + 2048}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_configs_shape_check_without_allocating(tmp_path, name):
  (tmp_path / "config.json").write_text(json.dumps(FULL_SIZE[name]))
  _, cfg = read_config(tmp_path)
  graphdef, params = abstract_model(cfg, "bfloat16")
  ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  out, _ = jax.eval_shape(lambda p, i: base.forward(graphdef, p, i,
                                                     jnp.ones((2, 64), jnp.int32),
                                                     (parse_hook("resid_post.11"),), (), False,
                                                     jnp.bfloat16), params, ids)
  assert out["resid_post.11"].shape == (2, 64, cfg.d_model)
  assert out["resid_post.11"].dtype == jnp.float32
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params))
  assert n == FULL_SIZE_PARAMS[name]


def test_bad_inputs_are_one_line_errors(tmp_path_factory, tmp_path):
  _, path = _save(tmp_path_factory, "llama_gqa")
  model = load_model(path)
  ids = np.zeros((1, 4), np.int64)
  with pytest.raises(ConfigError, match="past the last block"):
    model.activations(ids, ["resid_post.3"])
  with pytest.raises(ConfigError, match="unknown hook 'resid_mid.0'"):
    model.activations(ids, ["resid_mid.0"])
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
  with pytest.raises(UnsupportedModelError, match="model_type 'bert'"):
    load_model(bad)
  (bad / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
  with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
    load_model(bad)
  (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn",
                                                                       "factor": 2.0}}))
  with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
    load_model(bad)
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2",
                                               "use_sliding_window": True}))
  with pytest.raises(UnsupportedModelError, match="use_sliding_window=True"):
    load_model(bad)
  (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 88}))
  with pytest.raises(CheckpointError, match=r"mlp.down_proj.weight' has shape \(60, 86\), "
                                            r"expected \(60, 88\)"):
    load_model(bad)
  (bad / "config.json").write_text(json.dumps(cfg))
  tensors = load_file(str(bad / "model.safetensors"))
  tensors.pop("model.layers.1.mlp.up_proj.weight")
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    load_model(bad)
  with pytest.raises(CheckpointError, match="revision 'step99' not found"):
    load_model(path, revision="step99")
  # 6 heads, 2 key/value heads, MLP width 86 on a 4-way "model" axis: refused before any weight
  # is read (here there are none).
  (bad / "model.safetensors").unlink()
  with pytest.raises(ConfigError, match=r"'model' axis of size 4 does not divide heads=6, "
                                        r"kv_heads=2, mlp=86 .*allowed 'model' sizes: 1, 2$"):
    load_model(bad, mesh=sj.make_mesh(sj.MeshConfig(data=2, model=4)))


def test_pytorch_bin_weights_load_safely_and_tokenizer_comes_along(tmp_path):
  cls, kw = VARIANTS["llama_gqa"]
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cls(**kw)).eval()
  hf.save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").unlink()  # keep only a pytorch_model.bin (a pickle)
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  vocab = {f"w{i}": i for i in range(V)}
  tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(
      tmp_path)
  model = load_model(tmp_path)  # torch.load(weights_only=True): tensors only, no code
  ids = model.tokenizer(["w5 w7 w11 w3"], return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(ids, [[5, 7, 11, 3]])
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(model.logits(ids), ref, rtol=TOL, atol=TOL)


def test_hub_revision_offline_is_a_one_line_error(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  with pytest.raises(CheckpointError, match="cannot get 'EleutherAI/pythia-14m' at revision "
                                            "'step1000'"):
    load_model("EleutherAI/pythia-14m", revision="step1000")
