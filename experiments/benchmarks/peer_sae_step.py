# Copied unchanged from the project's shared peer harness (bench/peer_sae_step.py, given to
# the developers with its README) so the benchmark stands on its own; runs in the peers' venv.
"""Peer SAE training-step throughput on this machine (CPU, float32).

Times one TopK SAE optimisation step (encode, top-k, decode, FVU + AuxK loss,
backward, Adam, decoder renorm) in EleutherAI sparsify and SAELens on the same
synthetic activations, and the bare encoder matmul (the dense lower bound).
Prints one JSON line per system: tokens/s.
"""
import json, sys, time
import torch

D, M, K, N = (int(a) for a in (sys.argv[1:5] if len(sys.argv) > 4 else (512, 8192, 32, 4096)))
STEPS, WARM = 8, 3
torch.manual_seed(0)
x = torch.randn(N, D)

def timeit(fn):
    for _ in range(WARM):
        fn()
    t = time.perf_counter()
    for _ in range(STEPS):
        fn()
    return (time.perf_counter() - t) / STEPS

def report(name, sec):
    print(json.dumps({"system": name, "d": D, "m": M, "k": K, "n": N,
                      "step_s": round(sec, 5), "tokens_per_s": round(N / sec, 1),
                      "threads": torch.get_num_threads()}), flush=True)

W = torch.randn(D, M)
report("torch_encoder_matmul_bound", timeit(lambda: torch.relu(x @ W)))

from sparsify import SparseCoder, SparseCoderConfig
sae = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K))
opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
dead = torch.zeros(M, dtype=torch.bool); dead[: M // 4] = True
def sp_step():
    out = sae(x, dead_mask=dead)
    loss = out.fvu + out.auxk_loss / 32
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step(); opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()
report("sparsify", timeit(sp_step))

try:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    cfg = TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, device="cpu", dtype="float32")
    sl = TopKTrainingSAE(cfg)
    opt2 = torch.optim.Adam(sl.parameters(), lr=1e-4)
    dead_sl = dead.clone()
    def sl_step():
        out = sl.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead_sl, n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        opt2.step(); opt2.zero_grad(set_to_none=True)
    report("sae_lens", timeit(sl_step))
except Exception as e:  # report, do not hide
    print(json.dumps({"system": "sae_lens", "error": repr(e)[:300]}))
