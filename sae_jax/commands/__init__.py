"""``sae-jax <command> [flags]``: the console entry point (``[project.scripts]``).

Each command is an absl program in this package (``experiments/*.py`` are thin wrappers of the
same ones); only the chosen command's module is imported, so each keeps its own flags and
``sae-jax --help`` starts at once.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one line of help).
COMMANDS = {
    "trace": ("sae_jax.commands.trace", "SAEs for every checkpoint x hook, evaluated, analysed"),
    "analyze": ("sae_jax.commands.analyze", "features, labels, overlap, report.html of a trace"),
    "train-sae": ("sae_jax.commands.train_sae", "one SAE: one checkpoint, one hook"),
    "collect": ("sae_jax.commands.collect", "extract activations into tensorstore caches"),
    "plan": ("sae_jax.commands.plan", "compile for a TPU topology: memory, FLOPs, projected hours"),
    "label-examples": ("sae_jax.commands.label_examples",
                       "language and granularity labels of features from their examples"),
    "train-toy-lm": ("sae_jax.commands.train_toy_lm", "train the toy world's model alone"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: sae-jax <command> [--flags]   (sae-jax <command> --help: its flags)", "",
           "commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
  lines += ["", "  sae-jax trace --workdir=runs/toy                 the toy study (minutes)",
            "  sae-jax trace --config=toy:tiny --workdir=/tmp/t  seconds",
            "  sae-jax trace --config=llm_jp_3_1p8b --workdir=gs://bucket/run"]
  return "\n".join(lines)


def _load(name: str):
  """The command's module, or None when it is not part of this installation."""
  module = COMMANDS[name][0]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is None or not module.startswith(e.name):
      raise  # the command exists but something it needs is missing: say so in full
  return None


def main(argv: list[str] | None = None) -> int:
  """Dispatch ``sae-jax <command> ...`` to the command's absl program."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name = argv[1]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  module = _load(name)
  if module is None:
    print(f"error: sae-jax {name} is not available in this installation", file=sys.stderr)
    return 2
  rest = [f"sae-jax {name}"] + argv[2:]
  module.run(rest)
  return 0
