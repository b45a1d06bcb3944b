"""Runs a queue of paper runs on the GPUs of one machine, a few at a time per GPU, and
collects each finished run's reports into a folder that can be packed and copied off.

    python experiments/matrix.py run --root /scratch/runs --gpus 0 1 --slots-per-gpu 2 \\
        --deadline-s 1200 --config-args steps=3052 --set model.attention.impl=pallas \\
        --runs dense fib_stagger_w12 fib_fixed_w12
    python experiments/matrix.py poll --root /scratch/runs --wait 240 --pack out/results.tar.gz
    python experiments/matrix.py stop --root /scratch/runs

`run` is the supervisor: every slot (a GPU, shared by `--slots-per-gpu` processes, each
with its share of the GPU's memory) takes the next run of the queue and trains and
evaluates it with `experiments/reproduce.py` in a child process (`CUDA_VISIBLE_DEVICES`
names the slot's GPU). Sharing a GPU between two runs hides one run's compilation,
start-up and evaluation behind the other's training; the runs then take longer each, and
their wall times and tokens/s say so (`gpu_shared_by` in the status). A run that runs out
of GPU memory is put back at the head of the queue and its GPU runs one process from then
on. A run is started only if its estimated wall time ends before `--deadline-s` (seconds
after the supervisor starts); `stop` lets running runs finish and starts no more. Runs named
in `--alone` (the slow learned runs) start only on an empty GPU and keep it to themselves,
as does any run that would finish before the deadline only without company, and
`--gpu-busy GPU=PID` keeps the queue off a GPU until that process (a benchmark) ends.

Everything lands under --root: `<name>/` is the run's workdir (checkpoints, metrics,
`eval/`, `log.txt`), `status.json` the queue (rewritten atomically after every change) and
`results/<name>/` the files worth keeping (the evaluation report as JSON and CSV, the
metrics, the config, the log's tail and `run.json`: tokens, steps, wall time, GPU, exit
code). `poll` waits until another run finishes (or `--wait` seconds), prints the queue and
packs `status.json` and `results/` into one tar.gz: no checkpoints, nothing binary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from fibax.config_loader import add_overrides_argument, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]

STATUS = "status.json"
STOP = "STOP"
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
KEPT_FILES = (
  "eval/results-cap_run.json",
  "eval/results-cap_run.csv",
  "metrics.jsonl",
  "config.json",
)
# Seconds per train step of one run alone on a GPU and fixed seconds (start-up, compilation,
# evaluation), used only to decide whether a run can still finish before the deadline. Sparse:
# 3,052 steps in 304-319 s alone on an H200 (experiments/results/gpu_matrix_100m); learned:
# 2.56x a stagger step in one H200 benchmark. A GPU shared by k runs divides its steps among
# them (time-slicing gave no more steps per second than one run alone); compilation runs on
# the host and is not slowed.
# The one-hot embedding gradient takes a step on real text from ~96 to ~64 ms
# (experiments/results/embed_grad_h200); the sorted one (the default) is counted the same.
STEP_SECONDS = {"learned": 0.26, "other": 0.105, "other_onehot": 0.07}
FIXED_SECONDS = {"learned": 300.0, "other": 150.0, "other_onehot": 150.0}


def error(message: str) -> None:
  sys.exit(f"matrix.py: error: {message}")


def write_json(path: Path, data) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  os.replace(tmp, path)


def run_config(config: str, config_args: str, overrides: list[str], name: str):
  extra = f",{config_args}" if config_args else ""
  return apply_overrides(load_config(f"{config}:{name}{extra}"), overrides)


def estimate_seconds(cfg, shared_by: int) -> float:
  kind = "learned" if cfg.model.attention.schedule == "learned" else "other"
  if kind == "other" and cfg.model.embed_backward in ("onehot", "sorted"):
    kind = "other_onehot"
  return shared_by * cfg.train.total_steps * STEP_SECONDS[kind] + FIXED_SECONDS[kind]


def choose_run(queue, configs, alone, slots: int, busy: int, now: float, deadline):
  """The next run for a GPU with `busy` of its `slots` taken, and how many runs share the GPU
  while it runs: (name, shared), or (None, 1) when a run fits only on an empty GPU, or
  (None, 0) when no queued run can finish before `deadline` (None: no deadline).

  Runs in `alone` start only on an empty GPU and keep it (shared = 1). Any other run shares
  the GPU with up to `slots` runs; on an empty GPU, a run that would finish only without
  company also starts alone and keeps the GPU, so the last runs before a deadline still run.
  """

  def fits(name, shared):
    return deadline is None or now + estimate_seconds(configs[name], shared) <= deadline

  for name in queue:
    if name in alone:
      if not busy and fits(name, 1):
        return name, 1
    elif fits(name, slots):
      return name, slots
    elif not busy and fits(name, 1):
      return name, 1
  if any(fits(name, 1) for name in queue):
    return None, 1
  return None, 0


def length_mults(cfg, args) -> list[int]:
  return args.dense_length_mult if cfg.model.attention.schedule == "dense" else args.length_mult


def child_command(args, name: str, mults: list[int]) -> list[str]:
  cmd = [sys.executable, str(REPO / "experiments" / "reproduce.py"), "--config", args.config]
  cmd += ["--runs", name, "--root", str(args.root), "--out", str(args.root / name / "tables")]
  cmd += ["--length-mult", *map(str, mults), "--datasets", *args.datasets]
  if args.config_args:
    cmd += ["--config-args", args.config_args]
  if args.overrides:
    cmd += ["--set", *args.overrides]
  return cmd


def collect(root: Path, entry: dict, cfg) -> None:
  """Copies the run's reports into results/<name>/ with run.json beside them."""
  name = entry["name"]
  src, dst = root / name, root / "results" / name
  dst.mkdir(parents=True, exist_ok=True)
  # Paths are written relative to the folder above the root (runs/..., data/...): results
  # name no machine's directories.
  prefix = str(root.resolve().parent) + os.sep
  for rel in KEPT_FILES:
    if (src / rel).is_file():
      text = (src / rel).read_text(errors="replace")
      (dst / Path(rel).name).write_text(text.replace(prefix, ""))
  log = (
    (src / "log.txt").read_text(errors="replace").splitlines()
    if (src / "log.txt").is_file()
    else []
  )
  (dst / "log_tail.txt").write_text("\n".join(log[-80:]).replace(prefix, "") + "\n")
  steps, train_seconds = None, None
  if (src / "metrics.jsonl").is_file():
    records = [
      json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines() if line
    ]
    train = [r for r in records if r.get("kind") == "train"]
    if train:
      steps = max(r["step"] for r in train)
      train_seconds = train[-1]["time"] - train[0]["time"]
  tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
  entry.update(
    steps=steps,
    tokens=None if steps is None else steps * tokens_per_step,
    train_log_span_s=train_seconds,
  )
  write_json(dst / "run.json", json.loads(json.dumps(entry).replace(prefix, "")))


def supervise(args) -> int:
  root = args.root
  root.mkdir(parents=True, exist_ok=True)
  configs = {
    name: run_config(args.config, args.config_args, args.overrides, name) for name in args.runs
  }
  status_path = root / STATUS
  status = {
    "command": " ".join(["python", *sys.argv]),
    "started": time.time(),
    "deadline": time.time() + args.deadline_s if args.deadline_s else None,
    "runs": {name: {"name": name, "state": "queued"} for name in args.runs},
  }
  write_json(status_path, status)
  queue = list(args.runs)
  slots_per_gpu = {gpu: args.slots_per_gpu for gpu in args.gpus}
  running: dict[tuple[str, int], tuple[subprocess.Popen, dict]] = {}

  alone = set(args.alone)
  waits = dict(args.gpu_busy)

  def free_slots():
    for gpu in args.gpus:
      if gpu in waits and _alive(waits[gpu]):
        continue  # another process (a benchmark) has this GPU for now
      waits.pop(gpu, None)
      for k in range(slots_per_gpu[gpu]):
        if (gpu, k) not in running:
          yield gpu, k

  while queue or running:
    stopping = (root / STOP).exists()
    for slot in list(free_slots()):
      if stopping or not queue:
        break
      gpu = slot[0]
      busy = [running[s][1] for s in running if s[0] == gpu]
      if any(e["gpu_shared_by"] == 1 for e in busy) or len(busy) >= slots_per_gpu[gpu]:
        continue  # a run that keeps its GPU to itself is on it, or the GPU is full
      pick, shared = choose_run(
        queue, configs, alone, slots_per_gpu[gpu], len(busy), time.time(), status["deadline"]
      )
      if pick is None and shared:
        continue  # only runs that need an empty GPU can still finish; another GPU may do
      if pick is None:
        for n in queue:
          status["runs"][n]["state"] = "skipped: would not finish before the deadline"
        queue.clear()
        break
      queue.remove(pick)
      cfg = configs[pick]
      (root / pick).mkdir(parents=True, exist_ok=True)
      env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), PYTHONUNBUFFERED="1")
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.95 / shared:.3f}"
      log = open(root / pick / "log.txt", "ab")  # noqa: SIM115
      cmd = child_command(args, pick, length_mults(cfg, args))
      proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
      log.close()
      entry = status["runs"][pick]
      entry.update(
        state="running",
        gpu=gpu,
        slot=slot[1],
        gpu_shared_by=shared,
        start=time.time(),
        command=" ".join(["python", *cmd[1:]]),
        length_mults=length_mults(cfg, args),
        estimate_s=estimate_seconds(cfg, shared),
      )
      running[slot] = (proc, entry)
      write_json(status_path, status)
    for slot, (proc, entry) in list(running.items()):
      rc = proc.poll()
      if rc is None:
        continue
      del running[slot]
      entry.update(end=time.time(), returncode=rc)
      entry["wall_s"] = round(entry["end"] - entry["start"], 1)
      log_text = (root / entry["name"] / "log.txt").read_text(errors="replace")[-20000:]
      if rc != 0 and any(m in log_text for m in OOM_MARKERS) and slots_per_gpu[slot[0]] > 1:
        slots_per_gpu[slot[0]] = 1  # this GPU runs one process from now on
        entry["state"] = "queued (out of memory with a shared GPU; retried alone)"
        queue.insert(0, entry["name"])
      else:
        entry["state"] = "done" if rc == 0 else f"failed (exit code {rc})"
        collect(root, entry, configs[entry["name"]])
      write_json(status_path, status)
    time.sleep(2)
  status["finished"] = time.time()
  write_json(status_path, status)
  return 0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  try:  # an ended process that its parent has not reaped yet is a zombie: not alive
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return True


def _gpu_pid(text: str) -> tuple[int, int]:
  gpu, sep, pid = text.partition("=")
  if not (sep and gpu.isdigit() and pid.isdigit()):
    error(f"--gpu-busy {text!r}: expected GPU=PID, e.g. 3=12345")
  return int(gpu), int(pid)


def _done_count(root: Path) -> int:
  try:
    runs = json.loads((root / STATUS).read_text())["runs"].values()
  except (OSError, json.JSONDecodeError, KeyError):
    return 0
  return sum(1 for r in runs if r["state"] == "done" or r["state"].startswith("failed"))


def poll(args) -> int:
  root = args.root
  before = _done_count(root)
  end = time.time() + args.wait
  while time.time() < end and _done_count(root) == before:
    status_file = root / STATUS
    if status_file.is_file() and "finished" in json.loads(status_file.read_text()):
      break
    time.sleep(3)
  if not (root / STATUS).is_file():
    print(f"no {STATUS} under {root} yet")
    return 0
  if args.pack:  # first: output cut short (a closed pipe) must not cost the results
    pack = Path(args.pack)
    pack.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(pack, "w:gz") as tar:
      tar.add(root / STATUS, arcname=STATUS)
      if (root / "results").is_dir():
        tar.add(root / "results", arcname="results")
  status = json.loads((root / STATUS).read_text())
  now = time.time()
  lines = []
  for r in status["runs"].values():
    line = f"{r['name']:>24}  {r['state']}"
    if "start" in r:
      line += f"  gpu {r['gpu']}  {(r.get('end') or now) - r['start']:.0f} s"
    log = root / r["name"] / "log.txt"
    if r["state"] == "running" and log.is_file():
      tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:]
      line += f"  | {tail[0][-110:] if tail else ''}"
    lines.append(line)
  try:
    print("\n".join(lines), flush=True)
  except BrokenPipeError:
    pass
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  commands = p.add_subparsers(dest="command", required=True)
  r = commands.add_parser("run", help="train and evaluate a queue of runs on the local GPUs")
  r.add_argument("--root", type=Path, required=True)
  r.add_argument("--runs", nargs="+", required=True)
  r.add_argument("--config", default=str(REPO / "configs" / "paper.py"))
  r.add_argument("--config-args", default="", help="e.g. steps=3052")
  add_overrides_argument(r, "config overrides for every run")
  r.add_argument("--gpus", nargs="+", type=int, default=[0])
  r.add_argument("--slots-per-gpu", type=int, default=1)
  r.add_argument("--deadline-s", type=float, default=0, help="0: none")
  r.add_argument(
    "--alone", nargs="+", default=[], metavar="RUN",
    help="runs that take a GPU to themselves (slow ones that must finish by the deadline)",
  )  # fmt: skip
  r.add_argument(
    "--gpu-busy", nargs="+", default=[], metavar="GPU=PID",
    help="start nothing on GPU while process PID (e.g. a benchmark) is alive",
  )  # fmt: skip
  r.add_argument("--length-mult", nargs="+", type=int, default=[1, 2, 4, 16])
  r.add_argument("--dense-length-mult", nargs="+", type=int, default=[1, 2, 4])
  r.add_argument("--datasets", nargs="+", default=["validation", "sotu"])
  q = commands.add_parser("poll", help="wait for a run to finish; print and pack the results")
  q.add_argument("--root", type=Path, required=True)
  q.add_argument("--wait", type=float, default=0)
  q.add_argument("--pack", help="a .tar.gz to write status.json and results/ into")
  s = commands.add_parser("stop", help="start no more runs; running ones finish")
  s.add_argument("--root", type=Path, required=True)
  args = p.parse_args(argv)

  if args.command == "run":
    if args.slots_per_gpu < 1:
      error(f"--slots-per-gpu={args.slots_per_gpu} must be >= 1")
    if len(set(args.runs)) != len(args.runs):
      error(f"--runs names a run twice: {args.runs}")
    if stray := sorted(set(args.alone) - set(args.runs)):
      error(f"--alone names runs not in --runs: {stray}")
    args.gpu_busy = [_gpu_pid(text) for text in args.gpu_busy]
    if stray := sorted({g for g, _ in args.gpu_busy} - set(args.gpus)):
      error(f"--gpu-busy names GPUs not in --gpus: {stray}")
    if (args.root / STATUS).exists():
      error(f"{args.root / STATUS} exists: this root already has a queue; use a new --root")
    from fibax.evaluate import check_eval_args

    try:
      for name in args.runs:
        run_config(args.config, args.config_args, args.overrides, name)
      for mults in (args.length_mult, args.dense_length_mult):
        check_eval_args(mults, args.datasets)
    except (ValueError, TypeError, FileNotFoundError) as e:
      error(" ".join(str(e).split()))
    return supervise(args)
  if args.command == "poll":
    return poll(args)
  args.root.mkdir(parents=True, exist_ok=True)
  (args.root / STOP).touch()
  print(f"{args.root / STOP} written: no new runs will start")
  return 0


if __name__ == "__main__":
  sys.exit(main())
