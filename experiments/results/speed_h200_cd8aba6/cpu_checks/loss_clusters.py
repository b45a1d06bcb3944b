"""The loss after bench_train.py's steps at T = 1,024 on random tokens, per committed result
file that has a learned run: learned, stagger, dense (the README's clusters):

  python experiments/results/speed_h200_cd8aba6/cpu_checks/loss_clusters.py   # from the repo root
"""

import glob
import json

for path in sorted(glob.glob("experiments/results/*/*.json")):
  try:
    with open(path) as f:
      report = json.load(f)
  except (OSError, ValueError):
    continue
  if not isinstance(report, dict) or not isinstance(report.get("results"), list):
    continue
  if report.get("batches", "random tokens") != "random tokens":
    continue
  loss = {
    r["run"]: round(r["loss_after"], 4)
    for r in report["results"]
    if isinstance(r, dict) and r.get("seq_len") == 1024 and "loss_after" in r
  }
  if "fib_learned_w12" in loss:
    print(loss["fib_learned_w12"], loss.get("fib_stagger_w12"), loss.get("dense"), path)
