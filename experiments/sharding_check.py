"""The same run on one machine's devices laid out three ways, its loss curves side by side.

    python experiments/sharding_check.py --devices 4 \\
        --config configs/paper.py:fib_stagger_w12,steps=300 --root runs/sharding \\
        --set model.attention.impl=pallas data_dir=data/gutenberg \\
        --out experiments/results/sharding_h200x4

With N devices the layouts are: data over all N (mesh data = N, model = 1); a model axis of 2
(data = N / 2, model = 2); one device (data = 1, model = 1, the others hidden with
CUDA_VISIBLE_DEVICES, or on CPU with XLA's host device count). Each trains the same config
with the same global batch from scratch with `python -m fibax.train`, one after another, into
`--root/<layout>`. `--out` receives `sharding.json` (every logged loss of every layout, the
largest difference of each from the first, the command, versions) and `loss_curves.png`.
Sharding changes only the order of floating-point reductions, so the curves must agree to
within the compute dtype's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from experiments.bench_attention import versions
from fibax.config_loader import add_overrides_argument
from fibax.metrics import read_losses


def layouts(devices: int) -> list[tuple[str, int, int]]:
  """(name, mesh data, mesh model) for N devices: all data, a model axis of 2, one device."""
  out = [(f"data{devices}", devices, 1)]
  if devices >= 2 and devices % 2 == 0:
    out.append((f"data{devices // 2}_model2", devices // 2, 2))
  if devices > 1:
    out.append(("one_device", 1, 1))
  return out


def device_env(count: int) -> dict:
  """The environment of a child that sees only the first `count` devices (of those this
  process may see, where CUDA_VISIBLE_DEVICES already names some)."""
  env = dict(os.environ)
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if visible and len(visible) < count:
    sys.exit(
      f"sharding_check.py: error: {count} devices asked, CUDA_VISIBLE_DEVICES={','.join(visible)}"
    )
  env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:count] if visible else map(str, range(count)))
  flags = env.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    env["XLA_FLAGS"] = re.sub(
      r"--xla_force_host_platform_device_count=\d+",
      f"--xla_force_host_platform_device_count={count}",
      flags,
    )
  return env


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, required=True, help="devices of this machine")
  p.add_argument("--config", required=True, help="configs/<file>.py[:<run>[,key=value]]")
  p.add_argument("--root", type=Path, required=True, help="one workdir per layout under it")
  p.add_argument("--out", type=Path, required=True, help="sharding.json and loss_curves.png")
  p.add_argument(
    "--timeout-s",
    type=float,
    default=0,
    help="kill a layout that runs longer (a collective that waits forever); 0: no limit",
  )
  add_overrides_argument(p, "config overrides for every layout")
  args = p.parse_args(argv)
  if args.devices < 1:
    sys.exit(f"sharding_check.py: error: --devices={args.devices} must be >= 1")
  if args.timeout_s < 0:
    sys.exit(f"sharding_check.py: error: --timeout-s={args.timeout_s} must be >= 0")
  if args.root.exists():
    sys.exit(f"sharding_check.py: error: --root {args.root} exists; the layouts train afresh")
  report = {
    "command": " ".join(["python", *sys.argv]),
    "versions": versions(),
    "config": args.config,
    "overrides": args.overrides,
    "layouts": [],
  }
  curves = {}
  for name, data, model in layouts(args.devices):
    cmd = [
      sys.executable, "-m", "fibax.train", "--config", args.config,
      "--workdir", str(args.root / name),
      "--set", f"train.mesh_data={data}", f"train.mesh_model={model}", *args.overrides,
    ]  # fmt: skip
    print(f"{name}: mesh data={data} model={model}", flush=True)
    try:
      proc = subprocess.run(
        cmd,
        env=device_env(data * model),
        text=True,
        capture_output=True,
        timeout=args.timeout_s or None,
      )
    except subprocess.TimeoutExpired:
      sys.exit(f"sharding_check.py: error: {name} ran past --timeout-s={args.timeout_s:g}")
    if proc.returncode != 0:
      sys.exit(f"sharding_check.py: error: {name} failed: {proc.stderr.strip()[-2000:]}")
    curves[name] = read_losses(args.root / name)
    report["layouts"].append({"name": name, "mesh_data": data, "mesh_model": model})
  first = next(iter(curves))
  report["losses"] = {name: {str(s): v for s, v in c.items()} for name, c in curves.items()}
  report["summary"] = {
    f"max_abs_loss_diff_{name}_vs_{first}": max(
      abs(c[s] - curves[first][s]) for s in c.keys() & curves[first].keys()
    )
    for name, c in curves.items()
    if name != first
  }
  report["summary"].update({f"final_loss_{name}": c[max(c)] for name, c in curves.items()})
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "sharding.json").write_text(json.dumps(report, indent=1) + "\n")

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for (name, c), layout in zip(curves.items(), report["layouts"], strict=True):
    label = f"{name} (data {layout['mesh_data']} x model {layout['mesh_model']})"
    ax.plot(sorted(c), [c[s] for s in sorted(c)], label=label, linewidth=1)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.set_title(f"{args.config}: the same run, three device layouts")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out / "loss_curves.png", dpi=120)
  print(json.dumps(report["summary"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
