"""Peer SAE training-step throughput on one CUDA GPU (EleutherAI sparsify), for sae_step.py.

The CUDA twin of ``peer_sae_step.py`` (which times the peers on the CPU). Times one TopK SAE
optimisation step of sparsify exactly as its trainer runs it (its forward under its own bf16
autocast, its Triton decoder), with and without 25 % dead latents (AuxK on), and the bare
encoder matmul ``relu(x @ W)`` in float32 (TF32 allowed, as JAX's default precision allows) and
bfloat16, at the shape given on the command line. Prints one JSON line per measurement.

  python peer_sae_step_gpu.py D M K N
"""
import json
import sys

import torch

D, M, K, N = (int(a) for a in (sys.argv[1:5] if len(sys.argv) > 4 else (512, 8192, 32, 4096)))
STEPS, WARM = 20, 5
# JAX's default matmul precision on Hopper lets float32 dots run on TF32 tensor cores; let the
# peer do the same so neither side is handicapped by precision.
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
dev = torch.device("cuda")
torch.manual_seed(0)
x = torch.randn(N, D, device=dev)


def timeit(fn) -> float:
  """Median seconds per call over STEPS calls after WARM warm-ups, timed with CUDA events."""
  for _ in range(WARM):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(STEPS):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  times.sort()
  return times[len(times) // 2]


def report(name: str, sec: float, **extra) -> None:
  print(json.dumps({"system": name, "d": D, "m": M, "k": K, "n": N, "step_s": round(sec, 6),
                    "tokens_per_s": round(N / sec, 1), "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__, **extra}), flush=True)


W = torch.randn(D, M, device=dev) / D ** 0.5
report("torch_encoder_matmul_bound", timeit(lambda: torch.relu(x @ W)), dtype="tf32")
xb, Wb = x.bfloat16(), W.bfloat16()
report("torch_encoder_matmul_bound_bf16", timeit(lambda: torch.relu(xb @ Wb)), dtype="bfloat16")

from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402  (after the bounds: slow import)

for dead_fraction in (0.0, 0.25):
  sae = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K), device=dev)
  opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
  dead = torch.zeros(M, dtype=torch.bool, device=dev)
  dead[: int(M * dead_fraction)] = True

  def sp_step():
    out = sae(x, dead_mask=dead if dead_fraction else None)
    loss = out.fvu + out.auxk_loss / 32
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()

  report("sparsify" if not dead_fraction else "sparsify_auxk", timeit(sp_step),
         dead_fraction=dead_fraction, autocast="bfloat16")
