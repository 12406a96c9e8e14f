"""SAE files: round trips through every format, the paper's llm-jp-sae layout, bad files."""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae_jax as sj
from sae_jax.errors import CheckpointError, ConfigError
from sae_jax.saes import registry

D, M, K = 23, 131, 5


def make_sae(arch="topk", normalize="none", seed=0):
  cfg = sj.SAEConfig(architecture=arch, d_in=D, d_sae=M, k=K, normalize=normalize)
  a = registry.get(arch)
  ks = jax.random.split(jax.random.key(seed), 3)
  params = a.init_params(ks[0], cfg)
  params["b_enc"] = 0.05 * jax.random.normal(ks[1], (M,))
  params["b_dec"] = 0.1 * jax.random.normal(ks[2], (D,))
  if arch == "jumprelu":
    params["log_threshold"] = jnp.log(jnp.linspace(0.01, 0.2, M))
  buffers = a.init_buffers(cfg)
  buffers["norm_scale"] = jnp.float32(0.41)
  if arch == "batchtopk":
    buffers["threshold"] = jnp.float32(0.08)
  return sj.SAE(cfg, params, buffers, {"model_name": "toy", "hook_name": "resid_post.1"})


def inputs(n=17, seed=1):
  return np.asarray(3.0 * jax.random.normal(jax.random.key(seed), (n, D)), np.float32)


CASES = [("sae_jax", a, n) for a in ("topk", "batchtopk", "jumprelu", "relu")
         for n in ("none", "unit_norm", "expected_norm")]
CASES += [("sae_lens", a, n) for a in ("topk", "batchtopk", "jumprelu", "relu")
          for n in ("none", "unit_norm", "expected_norm")]
CASES += [("sparsify", "topk", n) for n in ("none", "expected_norm")]
CASES += [("llm_jp_sae", "topk", "unit_norm")]


@pytest.mark.parametrize("fmt, arch, normalize", CASES)
def test_round_trip_preserves_reconstructions(tmp_path, fmt, arch, normalize):
  sae = make_sae(arch, normalize)
  x = inputs()
  sae.export(tmp_path / "out", format=fmt) if fmt != "sae_jax" else sae.save(tmp_path / "out")
  assert sj.formats.detect_format(tmp_path / "out") == fmt
  back = sj.load_sae(tmp_path / "out")
  np.testing.assert_allclose(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)
  if arch == "topk":
    v1, i1 = sae.encode(x)
    v2, i2 = back.encode(x)
    np.testing.assert_array_equal(i1, i2)
    # Folding a constant input factor scales the codes by the same factor in every format.
    np.testing.assert_allclose(v2 / np.maximum(v2.max(), 1e-9), v1 / np.maximum(v1.max(), 1e-9),
                               rtol=1e-5, atol=1e-6)


def test_native_keeps_everything(tmp_path):
  sae = make_sae("batchtopk", "expected_norm")
  sae.save(tmp_path / "s")
  back = sj.load_sae(tmp_path / "s")
  assert back.cfg == sae.cfg and back.metadata["hook_name"] == "resid_post.1"
  assert back.metadata["model_name"] == "toy"
  assert back.params.keys() == sae.params.keys() and back.buffers.keys() == sae.buffers.keys()
  for k in sae.params:
    np.testing.assert_array_equal(back.params[k], sae.params[k])
  for k in sae.buffers:  # threshold 0.08 and norm_scale 0.41, bit for bit
    np.testing.assert_array_equal(back.buffers[k], sae.buffers[k])


@pytest.mark.parametrize("fmt, arch, normalize, fragment", [
    ("sparsify", "relu", "none", "TopK SAEs only"),
    ("sparsify", "topk", "unit_norm", "per-token"),
    ("llm_jp_sae", "topk", "none", "unit-norm inputs"),
    ("safetensors", "topk", "none", "unknown export format"),
])
def test_unrepresentable_exports_are_refused(tmp_path, fmt, arch, normalize, fragment):
  with pytest.raises(ConfigError, match=fragment):
    make_sae(arch, normalize).export(tmp_path / "x", format=fmt)
  assert not (tmp_path / "x").exists()


def _llm_jp_forward(enc_w, enc_b, dec_w, b_dec, k, x):
  """The llm-jp-sae format's own forward, in torch: unit-norm x, topk(relu(enc(x - b_dec)))."""
  import torch
  x = torch.tensor(x)
  x = x / x.norm(dim=-1, keepdim=True)
  acts = torch.relu(torch.nn.functional.linear(x - b_dec, enc_w, enc_b))
  top = acts.topk(k, sorted=False, dim=-1)
  z = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
  return (torch.nn.functional.linear(z, dec_w) + b_dec).numpy(), x.numpy(), top


def test_reads_the_papers_llm_jp_sae_layout(tmp_path):
  import torch
  from safetensors.torch import save_file
  torch.manual_seed(0)
  dec_w = torch.randn(D, M)
  dec_w /= dec_w.norm(dim=0, keepdim=True)
  enc_w = (dec_w.T + 0.01 * torch.randn(M, D)).contiguous()
  enc_b = 0.02 * torch.randn(M)
  b_dec = 0.05 * torch.randn(D)
  save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
             "b_dec": b_dec}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({
      "architectures": ["TopKSAE"], "model_type": "topk_sae", "d_in": D, "num_latents": M,
      "k": K, "torch_dtype": "float32", "transformers_version": "4.46.0"}))
  x = inputs(n=29, seed=3)
  ref, x_unit, top = _llm_jp_forward(enc_w, enc_b, dec_w, b_dec, K, x)
  sae = sj.load_sae(tmp_path)
  assert sae.cfg.normalize == "unit_norm" and sae.cfg.k == K
  np.testing.assert_allclose(sae.reconstruct(x_unit), ref, rtol=1e-5, atol=1e-5)
  vals, idx = sae.encode(x)
  np.testing.assert_array_equal(np.sort(np.asarray(idx), 1), np.sort(top.indices.numpy(), 1))
  np.testing.assert_allclose(np.sort(vals, 1), np.sort(top.values.numpy(), 1), rtol=1e-5,
                             atol=1e-6)


def test_pickle_weights_are_refused_without_running(tmp_path):
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  d = tmp_path / "sae"
  d.mkdir()
  (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
  (d / "config.json").write_text(json.dumps({"model_type": "topk_sae", "d_in": D,
                                             "num_latents": M, "k": K}))
  with pytest.raises(CheckpointError, match="never unpickles"):
    sj.load_sae(d)
  with pytest.raises(CheckpointError, match="pickle"):
    sj.load_sae(d / "pytorch_model.bin")
  assert not marker.exists()


def test_unreadable_files_are_one_line_errors(tmp_path):
  sae = make_sae()
  sae.save(tmp_path / "s")
  (tmp_path / "s" / "sae.safetensors").write_bytes(b"\x00garbage")
  with pytest.raises(CheckpointError, match="cannot read SAE weights"):
    sj.load_sae(tmp_path / "s")
  (tmp_path / "s" / "cfg.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="cannot read"):
    sj.load_sae(tmp_path / "s")
  with pytest.raises(CheckpointError, match="not a directory"):
    sj.load_sae(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no SAE recognised"):
    sj.load_sae(tmp_path / "empty")


def test_shape_mismatch_names_the_tensor(tmp_path):
  make_sae().export(tmp_path / "s", format="sparsify")
  c = json.loads((tmp_path / "s" / "cfg.json").read_text())
  c["num_latents"] = M + 1
  (tmp_path / "s" / "cfg.json").write_text(json.dumps(c))
  with pytest.raises(CheckpointError, match="encoder.weight"):
    sj.load_sae(tmp_path / "s")


class _V1SparseAutoEncoder:
  """The paper's v1 model (llm-jp-sae d9eb8c6 ``model.py``) re-stated in torch: encoder a
  default nn.Linear with zero bias, W_dec a unit-normalised copy of its weight, bfloat16."""

  def __init__(self, d_in, expansion_factor, k, seed):
    import torch
    torch.manual_seed(seed)
    self.k = k
    self.encoder = torch.nn.Linear(d_in, d_in * expansion_factor, dtype=torch.bfloat16)
    self.encoder.bias.data.normal_(0, 0.05)  # trained biases are not zero
    w = self.encoder.weight.data.clone()
    self.W_dec = w / (w.norm(dim=1, keepdim=True) + torch.finfo(w.dtype).eps)
    self.b_dec = (0.1 * torch.randn(d_in)).to(torch.bfloat16)

  def state_dict(self):
    return {"encoder.weight": self.encoder.weight.data, "encoder.bias": self.encoder.bias.data,
            "W_dec": self.W_dec, "b_dec": self.b_dec}

  def encode(self, x):
    """x: unit-norm inputs [N, D] (the paper normalises before the SAE)."""
    import torch
    with torch.no_grad():
      sae_in = x.float() - self.b_dec.float()
      latents = torch.relu(sae_in @ self.encoder.weight.float().T + self.encoder.bias.float())
      return latents.topk(self.k, sorted=True)


def test_paper_v1_sae_weights_load(tmp_path):
  """The released v1 SAEs (a transformers PreTrainedModel per checkpoint, bfloat16) load and
  encode as the paper's own forward does."""
  import torch
  from safetensors.torch import save_file
  ref = _V1SparseAutoEncoder(d_in=D, expansion_factor=6, k=K, seed=3)
  save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({
      "d_in": D, "expansion_factor": 6, "k": K, "torch_dtype": "bfloat16",
      "transformers_version": "4.46.0"}))  # what PretrainedConfig.save_pretrained writes
  sae = sj.load_sae(tmp_path)
  assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, sae.cfg.normalize) == (D, 6 * D, K,
                                                                         "unit_norm")
  assert sae.metadata["imported_from"] == "llm_jp_sae_v1"
  np.testing.assert_array_equal(np.asarray(sae.params["W_dec"]), ref.W_dec.float().numpy())
  x = np.random.default_rng(0).normal(size=(64, D)).astype(np.float32)
  x_unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  want_v, want_i = ref.encode(torch.from_numpy(x_unit))
  got_v, got_i = sae.encode(x)  # ours normalises the raw rows itself
  np.testing.assert_array_equal(np.asarray(got_i), want_i.numpy())
  np.testing.assert_allclose(np.asarray(got_v), want_v.numpy(), rtol=1e-5, atol=1e-6)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="llm_jp_sae_v1 config.json but no model.safetensors"):
    sj.load_sae(tmp_path)
