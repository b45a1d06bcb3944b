"""experiments/remote_matrix.sh: the corpus split into parts, moved, and checked on arrival."""

import os
import pathlib
import subprocess

from conftest import make_fixture_gutenberg

from fibax.data.sources import GutenbergSource

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "remote_matrix.sh"


def _sh(*args, env):
  return subprocess.run(
    ["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
  )


def test_split_then_receive_delivers_every_shard_intact(tmp_path):
  corpus = make_fixture_gutenberg(tmp_path / "corpus" / "gutenberg")
  env = dict(os.environ, FIBAX_STAGE=str(tmp_path / "stage"), FIBAX_SCRATCH=str(tmp_path / "s"))
  proc = _sh("split", corpus, env=env)
  assert proc.returncode == 0, proc.stderr
  parts = sorted((tmp_path / "stage").iterdir())
  assert [p.name for p in parts] == ["part-1"]  # two small shards fit one part
  assert sorted(f.name for f in parts[0].iterdir()) == [
    "MANIFEST.json", "shard-000.jsonl.xz", "shard-001.jsonl.xz"
  ]  # fmt: skip
  again = _sh("split", corpus, env=env)  # an existing stage is never overwritten
  assert again.returncode == 1 and "exists; remove it first" in again.stderr

  # Without every shard listed in MANIFEST.json, the queue does not start.
  (tmp_path / "s" / "corpus").mkdir(parents=True)
  (tmp_path / "s" / "corpus" / "MANIFEST.json").write_bytes((corpus / "MANIFEST.json").read_bytes())
  proc = _sh("start", 100, "dense", env=env)
  assert proc.returncode == 1 and "0 of 2 corpus shards received" in proc.stderr
  assert not (tmp_path / "s" / "runs").exists()

  proc = _sh("bench", 0, tmp_path / "out", env=env)  # nothing tokenized there yet
  assert proc.returncode == 1 and "no tokenized data" in proc.stderr

  proc = _sh("receive", parts[0], env=env)
  assert proc.returncode == 0 and "received 2 corpus shards" in proc.stdout, proc.stderr
  received = GutenbergSource(tmp_path / "s" / "corpus")
  docs = [d for u in received.units() for d in received.read(u.name)]  # sha256 checked
  assert len(docs) == 6


def test_when_runs_a_command_once_the_named_runs_have_ended(tmp_path):
  """`when` waits (detached) for the named runs of the queue, then runs the command from the
  queue's copy of the code; `poll` then packs its output folder."""
  import json
  import tarfile
  import time

  scratch = tmp_path / "s"
  (scratch / "runs").mkdir(parents=True)
  (scratch / "code").mkdir()
  status = scratch / "runs" / "status.json"

  def write_status(state):
    runs = {"a": {"state": state}, "b": {"state": "done"}}
    status.write_text(json.dumps({"runs": runs}))

  env = dict(os.environ, FIBAX_SCRATCH=str(scratch))
  marker = scratch / "extra" / "done.txt"
  # Issued while the queue still tokenizes (no status.json yet): it waits for the file.
  proc = _sh("when", "a b", "bash", "-c", f"pwd > {marker}", env=env)
  assert proc.returncode == 0 and "waiting for a b" in proc.stdout, proc.stderr
  time.sleep(6)
  assert not marker.exists()
  write_status("running")
  time.sleep(7)
  assert not marker.exists()  # a is still running
  write_status("done")
  log_file = scratch / "extra" / "when-0.log"
  for _ in range(40):  # the command's output, then the log's line that it ended (just after)
    if marker.exists() and "ended" in log_file.read_text():
      break
    time.sleep(0.5)
  assert marker.read_text().strip() == str(scratch / "code")
  log = log_file.read_text()
  assert "ended" in log and "exit code 0" in log

  missing = _sh("when", "a", env=env)
  assert missing.returncode == 1 and "no command given" in missing.stderr
  (scratch / "extra" / "samples.json").write_text("{}")
  (scratch / "runs" / "results").mkdir()
  subprocess.run(  # poll's own packing needs the queue's code: only the extra folder here
    ["tar", "-czf", str(tmp_path / "extra.tar.gz"), "-C", str(scratch), "extra"], check=True
  )
  with tarfile.open(tmp_path / "extra.tar.gz") as tar:
    assert "extra/samples.json" in tar.getnames()


def _fake_nvidia_smi(tmp_path, busy_uuids):
  """An nvidia-smi on PATH with GPUs 0 (GPU-a) and 1 (GPU-b); `busy` lists the GPUs that run a
  compute process, one uuid a line (the file is read on every call)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  busy = tmp_path / "busy"
  busy.write_text("".join(u + "\n" for u in busy_uuids))
  (bin_dir / "nvidia-smi").write_text(
    "#!/bin/sh\n"
    'case "$*" in\n'
    f"  *query-compute-apps*) cat {busy} ;;\n"
    '  *query-gpu=index,uuid*) printf "0, GPU-a\\n1, GPU-b\\n" ;;\n'
    '  -L) printf "GPU 0: fake\\nGPU 1: fake\\n" ;;\n'
    "esac\n"
  )
  (bin_dir / "nvidia-smi").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FIBAX_SCRATCH=str(tmp_path / "s"))
  return busy, env


def test_timings_and_multi_gpu_checks_refuse_a_gpu_that_another_process_uses(tmp_path):
  """A benchmark beside another process times both, and a sharded run short of memory on one
  GPU can wait forever in a collective: both refuse a busy GPU, naming it, or wait for it."""
  import threading

  busy, env = _fake_nvidia_smi(tmp_path, ["GPU-b", "GPU-b"])
  (tmp_path / "s" / "data" / "gutenberg").mkdir(parents=True)
  (tmp_path / "s" / "data" / "gutenberg" / "manifest.json").write_text("{}")
  proc = _sh("sharding", tmp_path / "out", env=env)
  assert proc.returncode == 1, proc.stderr
  assert "sharding: GPU 1 still runs another process after 0 s" in proc.stderr
  proc = _sh("bench", 1, tmp_path / "out", env=env)
  assert proc.returncode == 1 and "bench: GPU 1 still runs another process" in proc.stderr
  assert not (tmp_path / "out").exists()

  proc = _sh("wait-free", "0", 0, env=env)  # GPU 0 is free
  assert proc.returncode == 0 and "GPU 0: no other process" in proc.stdout, proc.stderr
  import time

  threading.Timer(3, busy.write_text, args=("",)).start()  # GPU 1's process ends after 3 s
  start = time.monotonic()
  proc = _sh("wait-free", "0 1", 30, env=env)
  assert proc.returncode == 0 and "GPU 0 1: no other process" in proc.stdout, proc.stderr
  assert time.monotonic() - start >= 3


def test_speed_suite_runs_its_steps_detached_and_packs_what_they_wrote(tmp_path):
  """speed_suite.sh: the named steps run in order in a detached process (an unknown one is
  logged and skipped, as is train_text without its data), `poll` waits for the end and packs
  the results, and a second `start` refuses rather than mixing two suites' files; SPEED_NAME
  names its folder and archive."""
  import sys
  import tarfile

  suite = SCRIPT.with_name("speed_suite.sh")
  env = dict(
    os.environ, FIBAX_SCRATCH=str(tmp_path / "s"), SPEED_STEPS="bogus train_text tests_packed"
  )
  env["SPEED_NAME"] = "suite_a"
  env["SPEED_COMMIT"] = "abc1234"  # the tree's commit, named by whoever copied it there
  env.pop("SPEED_DATA", None)
  env["PATH"] = f"{pathlib.Path(sys.executable).parent}:{env['PATH']}"  # `python`: this one

  def sh(*args):
    return subprocess.run(
      ["bash", str(suite), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )

  proc = sh("start", 0)
  assert proc.returncode == 0, proc.stderr
  proc = sh("poll", 240, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr
  log = (tmp_path / "s" / "suite_a" / "log.txt").read_text().splitlines()
  assert [line.split(" ", 1)[1].split(":")[0] for line in log] == [
    "unknown step bogus",
    "skipped train_text",  # no SPEED_DATA
    "start tests_packed",
    "end tests_packed",
    "done",
  ]
  assert "end tests_packed: exit 0" in log[3]  # no GPU here: the GPU tests skip, and pytest says so
  with tarfile.open(tmp_path / "out" / "suite_a.tar.gz") as tar:
    names = tar.getnames()
  assert {"suite_a/log.txt", "suite_a/tests_packed.log", "suite_a/tests_packed.xml"} <= set(names)
  assert (tmp_path / "s" / "suite_a" / "commit.txt").read_text() == "abc1234\n"  # SPEED_COMMIT
  again = sh("start", 0)
  assert again.returncode == 1 and "was already started" in again.stderr


def _logging_python(tmp_path, more: str = ""):
  """A stand-in `python` that logs each call's arguments ("|"-separated, a line a call) to the
  returned file, then runs `more` (bash); the environment that puts it first on PATH, with
  FIBAX_SCRATCH at tmp_path / "s"."""
  calls = tmp_path / "calls.txt"
  fake = tmp_path / "bin" / "python"
  fake.parent.mkdir()
  fake.write_text(f'#!/bin/bash\nprintf "%s|" "$@" >> {calls}\necho >> {calls}\n{more}')
  fake.chmod(0o755)
  path = f"{fake.parent}:{os.environ['PATH']}"
  return calls, dict(os.environ, FIBAX_SCRATCH=str(tmp_path / "s"), PATH=path)


def test_speed_suite_latency_step_and_a_test_step_with_its_own_cases(tmp_path):
  """speed_suite.sh: `latency` runs `fibax.eval latency` once per impl and length, each into
  its own JSON; TEST_K replaces the -k expression of the suite's test steps (tests_model's
  and tests_norm's too), its brackets and parentheses kept through a queue file's line.
  `python` is a stand-in that logs its calls."""
  suite = SCRIPT.with_name("speed_suite.sh")
  calls, env = _logging_python(tmp_path)
  queue = tmp_path / "queue.txt"
  queue.write_text(
    'lat SPEED_STEPS="latency tests_diagonal tests_model tests_norm" '
    'LAT_IMPLS="pallas_packed xla" '
    "LAT_LENS=1024 "
    'LAT_BATCH="1 8" TEST_K="GpuPackedDiagonalKernel and (44] or 45])"\n'
  )

  def sh(*args):
    return subprocess.run(
      ["bash", str(suite), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )

  assert sh("queue", 0, queue).returncode == 0
  proc = sh("poll-all", 60, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr
  argvs = [line.rstrip("|").split("|") for line in calls.read_text().splitlines()]
  argvs = [a for a in argvs if a[:1] != ["-c"]]  # not the suite's probe for pytest-timeout
  out = str(tmp_path / "s" / "lat")
  assert [a[:3] + a[a.index("--impl") : a.index("--impl") + 2] for a in argvs[:2]] == [
    ["-m", "fibax.eval", "latency", "--impl", "pallas_packed"],
    ["-m", "fibax.eval", "latency", "--impl", "xla"],
  ]
  tail = ["--batch", "1", "8", "--out", f"{out}/latency_xla_T1024.json"]
  assert argvs[1][argvs[1].index("--batch") :] == tail
  assert "--seq-len" in argvs[0] and argvs[0][argvs[0].index("--seq-len") + 1] == "1024"
  kernels, model, norm = [a for a in argvs if "pytest" in a][-3:]
  assert kernels[kernels.index("-k") + 1] == "GpuPackedDiagonalKernel and (44] or 45])"
  at = model.index("tests/test_model.py")
  k = "GpuPackedDiagonalKernel and (44] or 45])"
  assert model[at : at + 4] == ["tests/test_model.py", "tests/test_train.py", "-k", k]
  assert norm[norm.index("-k") + 1] == k and "tests/test_norm.py" in norm


def test_speed_suite_queues_from_another_directory_by_relative_paths(tmp_path):
  """A copy of the checkout called by a relative path from elsewhere, with its queue file
  relative to the caller: the queue runs that copy's suite (not a script of the caller's
  directory) and is done. `python` is a stand-in that logs its calls."""
  suite = SCRIPT.with_name("speed_suite.sh")
  calls, env = _logging_python(tmp_path)
  caller = tmp_path / "elsewhere"
  caller.mkdir()
  (caller / "q.txt").write_text("lat SPEED_STEPS=latency LAT_IMPLS=xla LAT_LENS=64 LAT_BATCH=1\n")
  rel = os.path.relpath(suite, caller)

  def sh(*args):
    return subprocess.run(
      ["bash", rel, *map(str, args)], capture_output=True, text=True, env=env, timeout=120,
      cwd=caller,
    )  # fmt: skip

  proc = sh("queue", 0, "q.txt")
  assert proc.returncode == 0, proc.stderr
  proc = sh("poll-all", 60, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr
  assert "queue done" in (tmp_path / "s" / "queue_0.log").read_text()
  assert "end latency_xla_T64: exit 0" in (tmp_path / "s" / "lat" / "log.txt").read_text()
  assert "fibax.eval|latency" in calls.read_text()


def test_a_queue_runs_from_a_snapshot_of_the_checkout(tmp_path):
  """`queue` copies the checkout and runs its suites from the copy: a runner that replaces the
  checkout's files while a queue runs (here: deletes its experiments/) does not stop a later
  suite of the queue from starting. The suites' commit.txt is the checkout's HEAD, a relative
  SPEED_DATA is the checkout's, a relative FIBAX_SCRATCH the caller's; the copy is deleted
  when the queue is done. `python` is a stand-in that logs its calls."""
  import shutil
  import time

  suite = SCRIPT.with_name("speed_suite.sh")
  repo = tmp_path / "repo"
  (repo / "experiments").mkdir(parents=True)
  for name in ("speed_suite.sh", "gpu_env.sh"):
    shutil.copy(suite.with_name(name), repo / "experiments" / name)
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
    subprocess.run([*git, *cmd], check=True, capture_output=True)
  head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
  calls, env = _logging_python(tmp_path)
  env["FIBAX_SCRATCH"] = "s"  # relative to the caller, tmp_path
  env.pop("SPEED_COMMIT", None)
  queue = tmp_path / "q.txt"
  queue.write_text(
    "first SPEED_STEPS=bogus\n"
    'second SPEED_STEPS="latency train_run" LAT_IMPLS=xla LAT_LENS=64 LAT_BATCH=1 SPEED_DATA=d '
    "RUN_BLOCKS=default\n"
  )

  def sh(script, *args):
    return subprocess.run(
      ["bash", str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=120,
      cwd=tmp_path,
    )  # fmt: skip

  proc = sh(repo / "experiments" / "speed_suite.sh", "queue", 0, queue)
  assert proc.returncode == 0, proc.stderr
  shutil.rmtree(repo / "experiments")  # the checkout replaced under the running queue
  proc = sh(suite, "poll-all", 60, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr
  scratch = tmp_path / "s"
  assert "queue done" in (scratch / "queue_0.log").read_text()
  log = (scratch / "second" / "log.txt").read_text()
  assert "end latency_xla_T64: exit 0" in log and "end train_run_0: exit 0" in log
  assert f"data_dir={repo}/d|" in calls.read_text()
  assert (scratch / "second" / "commit.txt").read_text() == head
  for _ in range(50):  # the snapshot is deleted once the queue is done
    if not (scratch / "tree_0").exists():
      break
    time.sleep(0.2)
  assert not (scratch / "tree_0").exists()


def test_speed_suite_compile_and_train_run_steps(tmp_path):
  """speed_suite.sh: `compile` runs compile_attention.py once per spec and layer count, each
  into its own JSON; `train_run` trains once per blocks spec ("default": no override), on
  SPEED_DATA, each in its own workdir, keeping the metrics and deleting the checkpoints.
  `python` is a stand-in that logs its calls and writes a run's files."""
  suite = SCRIPT.with_name("speed_suite.sh")
  calls, env = _logging_python(
    tmp_path,  # and a training run's files
    'for ((i = 1; i < $#; i++)); do if [ "${!i}" = --workdir ]; then j=$((i + 1)); '
    'mkdir -p "${!j}/checkpoints"; echo "{}" > "${!j}/metrics.jsonl"; fi; done\n',
  )
  env |= dict(
    SPEED_STEPS="compile train_run", SPEED_NAME="cr", SPEED_DATA="/data/x",
    COMPILE_SPECS="16,4,16,4 default", COMPILE_LAYERS="1 16",
    COMPILE_RUNS="fib_stagger_w12 fib_learned_w12",
    RUN_BLOCKS="default 16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3", RUN_SETS="train.total_steps=5",
  )  # fmt: skip

  def sh(*args):
    return subprocess.run(
      ["bash", str(suite), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )

  assert sh("start", 0).returncode == 0
  proc = sh("poll", 60, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr
  argvs = [line.rstrip("|").split("|") for line in calls.read_text().splitlines()]
  argvs = [a for a in argvs if a[:1] != ["-c"]]  # not the suite's probe for pytest-timeout
  out = tmp_path / "s" / "cr"
  compiles = [a for a in argvs if a[0] == "experiments/compile_attention.py"]

  def arg(a, flag):
    return a[a.index(flag) + 1] if flag in a else None

  assert [(arg(a, "--run"), arg(a, "--blocks"), arg(a, "--layers")) for a in compiles] == [
    (run, blocks, layers)
    for run in ("fib_stagger_w12", "fib_learned_w12")
    for blocks in ("16,4,16,4", None)  # "default": no --blocks
    for layers in ("1", "16")
  ]
  assert arg(compiles[7], "--out") == f"{out}/compile_7.json"
  runs = [a for a in argvs if a[:2] == ["-m", "fibax.train"]]
  assert len(runs) == 2
  for n, run in enumerate(runs):
    sets = run[run.index("--set") + 1 :]
    assert sets[0] == "data_dir=/data/x" and sets[-1] == "train.total_steps=5"
    blocks = [x for x in sets if x.startswith("model.attention.gpu_blocks=")]
    assert blocks == ([] if n == 0 else ["model.attention.gpu_blocks=" + env["RUN_BLOCKS"][8:]])
    assert run[run.index("--workdir") + 1] == f"{tmp_path}/s/runs/cr/run_{n}"
    assert (out / f"run_{n}" / "metrics.jsonl").read_text() == "{}\n"
    assert not (tmp_path / "s" / "runs" / "cr" / f"run_{n}" / "checkpoints").exists()
  assert (out / "run_0" / "blocks.txt").read_text() == "default\n"


def test_start_with_sharding_first_runs_the_check_then_the_queue_within_the_deadline(tmp_path):
  """SHARDING_FIRST=1: tokenize, the sharding check on every GPU, then the queue, whose
  deadline is what is left of the one given to `start` (tokenizing and the check come out of
  it), with one compilation cache for its runs. `python` is a stand-in that logs its calls."""
  import json
  import time

  _, env = _fake_nvidia_smi(tmp_path, [])
  scratch = tmp_path / "s"
  corpus = make_fixture_gutenberg(scratch / "corpus")
  assert corpus.is_dir()
  calls = tmp_path / "calls.jsonl"
  fake = tmp_path / "bin" / "python"
  fake.write_text(
    "#!/bin/sh\n"  # prepare writes a manifest; the sharding check takes 3 s
    f'printf \'{{"argv": "%s", "cache": "%s", "t": %s}}\\n\' "$*" "$JAX_COMPILATION_CACHE_DIR"'
    f' "$(date +%s)" >> {calls}\n'
    'case "$*" in\n'
    '  *"fibax.data prepare"*) mkdir -p "$(echo "$*" | sed "s/.*--out \\([^ ]*\\).*/\\1/")" &&'
    ' echo {} > "$(echo "$*" | sed "s/.*--out \\([^ ]*\\).*/\\1/")/manifest.json" ;;\n'
    "  *sharding_check*) sleep 3 ;;\n"
    "esac\n"
  )
  fake.chmod(0o755)
  env["SHARDING_FIRST"] = "1"
  env["QUEUE_GPUS"] = "1"  # the queue on GPU 1 only; the check on both
  proc = _sh("start", 1000, "dense", "fib_stagger_w12", env=env)
  assert proc.returncode == 0, proc.stderr
  for _ in range(60):
    if calls.is_file() and "matrix.py run" in calls.read_text():
      break
    time.sleep(0.5)
  argv = [json.loads(line) for line in calls.read_text().splitlines()]
  assert ["fibax.data prepare" in argv[0]["argv"], "sharding_check.py" in argv[1]["argv"]] == [
    True,
    True,
  ]
  assert "--devices 2" in argv[1]["argv"] and str(scratch / "extra" / "sharding") in argv[1]["argv"]
  run = argv[2]["argv"]
  assert "matrix.py run" in run and run.endswith("--runs dense fib_stagger_w12")
  assert " --gpus 1 " in run
  left = int(run.split("--deadline-s ")[1].split()[0])
  assert 990 <= left <= 997  # the check's 3 s (and a second or two more) came out of it
  assert {a["cache"] for a in argv} == {str(scratch / "jax_cache")}


def test_sharding_on_named_gpus_with_other_data(tmp_path):
  """SHARDING_GPUS picks the GPUs of the check (a busy other GPU does not hold it up; the
  child sees only those) and SHARDING_DATA another tokenized folder."""
  busy, env = _fake_nvidia_smi(tmp_path, ["GPU-a"])  # GPU 0 trains something else
  data = tmp_path / "s" / "data" / "sotu-abc"
  data.mkdir(parents=True)
  (data / "manifest.json").write_text("{}")
  calls = tmp_path / "calls.txt"
  fake = tmp_path / "bin" / "python"
  fake.write_text(f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES|$*" >> {calls}\n')
  fake.chmod(0o755)
  env.update(SHARDING_GPUS="1", SHARDING_DATA=str(data))
  proc = _sh("sharding", tmp_path / "out", env=env)
  assert proc.returncode == 0, proc.stderr
  line = [x for x in calls.read_text().splitlines() if "sharding_check.py" in x][0]
  visible, argv = line.split("|", 1)
  assert visible == "1" and "--devices 1" in argv and f"data_dir={data}" in argv
  env["SHARDING_DATA"] = str(tmp_path / "nothing")
  proc = _sh("sharding", tmp_path / "out", env=env)
  assert proc.returncode == 1 and f"no tokenized data in {tmp_path / 'nothing'}" in proc.stderr


def test_a_speed_queue_runs_its_suites_one_after_another_and_packs_them_all(tmp_path):
  """speed_suite.sh queue: the file's suites (`NAME VAR=VALUE ...`, quotes kept, comments
  skipped) start one after another on one GPU, each when the one before is done; `poll-all`
  waits for every queue and packs every suite; a later queue on that GPU waits for the earlier
  one; a bad suite name or a suite already started is refused before anything starts."""
  import sys
  import tarfile

  suite = SCRIPT.with_name("speed_suite.sh")
  scratch = tmp_path / "s"
  env = dict(os.environ, FIBAX_SCRATCH=str(scratch))
  env["PATH"] = f"{pathlib.Path(sys.executable).parent}:{env['PATH']}"
  for k in ("SPEED_NAME", "SPEED_STEPS"):
    env.pop(k, None)

  def sh(*args):
    return subprocess.run(
      ["bash", str(suite), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )

  queue = tmp_path / "q.txt"
  # An unset variable fails its own line only; the last line has no newline.
  queue.write_text(
    '# timings\nfirst SPEED_STEPS="bogus other"\n\nbroken SPEED_STEPS="$UNSET_VAR"\n'
    "second SPEED_STEPS=bogus2"
  )
  env.pop("UNSET_VAR", None)
  bad = tmp_path / "bad.txt"
  bad.write_text("no/slash SPEED_STEPS=x\n")
  assert sh("queue", 0, bad).returncode == 1 and not scratch.exists()
  proc = sh("queue", 0, queue)
  assert proc.returncode == 0, proc.stderr
  proc = sh("poll-all", 120, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr
  lines = (scratch / "queue_0.log").read_text().splitlines()
  assert [line.split(" ", 1)[1].split(":")[0] for line in lines] == [
    "start first", "end first", "start broken", "failed to start broken (queue_0.starts)",
    "start second", "end second", "queue done",
  ]  # fmt: skip
  assert "UNSET_VAR" in (scratch / "queue_0.starts").read_text()
  first = (scratch / "first" / "log.txt").read_text()
  assert "unknown step bogus" in first and "unknown step other" in first  # the quotes held
  assert "unknown step bogus2" in (scratch / "second" / "log.txt").read_text()
  (scratch / "data").mkdir()  # something else in the scratch folder: not packed
  proc = sh("poll-all", 1, tmp_path / "out")
  with tarfile.open(tmp_path / "out" / "all.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"first/log.txt", "second/log.txt", "queue_0.log", "queue_0.txt"} <= names
  assert not any(n.startswith("data") for n in names)
  again = sh("queue", 0, queue)
  assert again.returncode == 1 and "already started" in again.stderr
  other_gpu = sh("queue", 1, queue)  # its suites exist already
  assert other_gpu.returncode == 1 and "was already started" in other_gpu.stderr
  # A later queue on the same GPU starts its suites after the earlier queue is done.
  later = tmp_path / "later.txt"
  later.write_text("third SPEED_STEPS=bogus3\n")
  proc = sh("queue", 0, later)
  assert proc.returncode == 0 and "queue 0.1 on GPU 0 started (after queue 0)" in proc.stdout
  assert sh("poll-all", 120, tmp_path / "out").returncode == 0
  done_at = int(lines[-1].split()[0])
  started_at = int((scratch / "queue_0.1.log").read_text().split()[0])
  assert started_at >= done_at
  assert "unknown step bogus3" in (scratch / "third" / "log.txt").read_text()
  with tarfile.open(tmp_path / "out" / "all.tar.gz") as tar:
    assert {"third/log.txt", "queue_0.1.log", "first/log.txt"} <= set(tar.getnames())
