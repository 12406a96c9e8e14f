"""Where a finished trace's time went, from its ``trace.log`` timestamps: JSON lines.

    python experiments/benchmarks/toy_trace_phases.py runs/toy

Phases: the toy model (world + LM training, to the first SAE line), each checkpoint's SAEs
(from its "training" line to its last finished-SAE line, with the gap before it: model load,
data), and the analysis (the last SAE line to the end of the log). On a shared machine pair it
with the process's CPU time (``/usr/bin/time -v``): wall time counts the neighbours too.
"""

import datetime
import json
import re
import sys
from pathlib import Path

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (.*)$")


def phases(log: str) -> list[dict]:
  """[{phase, seconds}] from the log's stamped lines (a progress line's carriage returns
  split it into several)."""
  lines = []
  for raw in log.replace("\r", "\n").splitlines():
    m = _STAMP.match(raw.strip())
    if m:
      lines.append((datetime.datetime.fromisoformat(m.group(1)), m.group(2)))
  if not lines:
    return []
  out, start = [], lines[0][0]
  first_sae = next((t for t, s in lines if re.match(r"training \d+ ", s)), None)
  if first_sae is not None:
    out.append({"phase": "toy model (world + LM)", "seconds": int((first_sae - start).total_seconds())})
  prev_end = first_sae
  for t, s in lines:
    m = re.match(r"\[(\d+)/(\d+)\] (\S+) (\S+): ", s)
    if m and "@seed" not in m.group(4) and prev_end is not None:
      out.append({"phase": f"checkpoint {m.group(3)}", "seconds": int((t - prev_end).total_seconds())})
    if m:
      prev_end = t
  if prev_end is not None:
    out.append({"phase": "summary + analysis", "seconds": int((lines[-1][0] - prev_end).total_seconds())})
  out.append({"phase": "total", "seconds": int((lines[-1][0] - start).total_seconds())})
  return out


if __name__ == "__main__":
  for row in phases(Path(sys.argv[1], "trace.log").read_text(encoding="utf-8")):
    print(json.dumps(row))
