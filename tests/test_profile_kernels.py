"""experiments/profile_kernels.py: its ncu summary, its workload, and its errors (CPU)."""

import pytest

from experiments import profile_kernels as pk

STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


def _raw_csv(*launches):
  """ncu's raw page: a header row, a units row, a row a launch."""
  names = ["ID", "Kernel Name", "Grid Size", "Block Size", "gpu__time_duration.sum",
           "lts__t_sector_hit_rate.pct", "launch__registers_per_thread", "smsp__inst_executed.sum",
           *(STALL.format(r) for r in ("long_scoreboard", "barrier", "wait", "math_pipe_throttle",
                                       "short_scoreboard", "mio_throttle"))]  # fmt: skip
  units = ["", "", "", "", launches[0][0], "%", "register/thread", "inst", *[""] * 6]
  rows = [names, units, *[[str(i), *launch[1:]] for i, launch in enumerate(launches)]]
  return "\n".join(",".join(f'"{x}"' for x in row) for row in rows) + "\n"


def test_summary_reads_each_launch_with_its_units_and_top_stalls():
  raw = _raw_csv(
    ("ns", "fib_attention_packed_dkv", "(64, 32, 2)", "(128, 1, 1)", "147,500", "88.5",
     "168", "99,074,048", "9.5", "0.25", "1", "3", "0.5", "2.75"),
    ("ns", "fib_attention_packed_fwd", "(64, 32, 2)", "(64, 1, 1)", "81,000", "n/a",
     "255", "n/a", "4", "0", "0.5", "1", "2", "0.125"),
  )  # fmt: skip
  dkv, fwd = pk.summarize(raw)
  assert dkv["kernel"] == "fib_attention_packed_dkv" and dkv["grid"] == "(64, 32, 2)"
  assert dkv["duration_us"] == 147.5 and dkv["l2_hit_pct"] == 88.5  # ns -> us
  assert dkv["registers_per_thread"] == 168 and dkv["instructions"] == 99074048
  assert "instructions" not in fwd
  assert list(dkv["stalls"].items()) == [
    ("long_scoreboard", 9.5), ("math_pipe_throttle", 3.0), ("mio_throttle", 2.75),
    ("wait", 1.0), ("short_scoreboard", 0.5),
  ]  # fmt: skip  # the 5 largest, largest first; barrier's 0.25 is left out
  assert "l2_hit_pct" not in fwd and "dram_throughput_pct" not in dkv  # not reported: absent
  assert "barrier" not in fwd["stalls"] and len(fwd["stalls"]) == 5  # zeros are not stalls
  raw_us = _raw_csv(("us", "k", "(1, 1, 1)", "(32, 1, 1)", "2.5", "1", "32", "1", *["0"] * 6))
  assert pk.summarize("==WARNING== a note\n" + raw_us)[0]["duration_us"] == 2.5
  raw_s = _raw_csv(("s", "k", "(1, 1, 1)", "(32, 1, 1)", "2.5", "1", "32", "1", *["0"] * 6))
  with pytest.raises(ValueError, match="unknown time unit 's' of gpu__time_duration.sum"):
    pk.summarize(raw_s)
  with pytest.raises(ValueError, match="no ncu raw report"):
    pk.summarize("==ERROR== no kernels were profiled\n")


def test_the_workload_runs_each_length_once(capsys):
  """The profiled process's work: the packed kernel's forward and backward at each length (here
  in the GPU interpreter, at a small size)."""
  pk.main(["--workload", "--backend", "gpu_interpret", "--lengths", "32", "64", "--tokens", "64",
           "--out", "unused.json"])  # fmt: skip
  assert capsys.readouterr().err.splitlines() == [
    "T=32 pallas_packed: ran",
    "T=64 pallas_packed: ran",
  ]


def test_no_ncu_and_bad_blocks_are_one_line_errors(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(pk.shutil, "which", lambda name: None)
  monkeypatch.setattr(pk.glob, "glob", lambda pattern: [])
  with pytest.raises(SystemExit):
    pk.main(["--out", str(tmp_path / "n.json")])
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
    "profile_kernels.py: error: no ncu on PATH, under /opt/nvidia/nsight-compute or in "
    "/usr/local/cuda/bin: install Nsight Compute"
  )
  with pytest.raises(SystemExit):
    pk.main(["--blocks", "16,2", "--out", str(tmp_path / "n.json")])
  assert "error: --blocks: bad block config '16,2'" in capsys.readouterr().err
  assert not list(tmp_path.iterdir())  # nothing written


def _fake_ncu(tmp_path, raw: str, profile_rc: int = 0):
  """A stand-in for ncu: profiling runs the command it is given (and writes a report and the
  XLA_FLAGS it saw), or exits with `profile_rc`; --import prints `raw`."""
  import sys

  (tmp_path / "raw.csv").write_text(raw)
  fake = tmp_path / "ncu"
  fake.write_text(
    f"#!{sys.executable}\n"
    "import os, pathlib, subprocess, sys\n"
    "a = sys.argv[1:]\n"
    "if '--import' in a:\n"
    f"  print(pathlib.Path({str(tmp_path / 'raw.csv')!r}).read_text(), end='')\n"
    "  sys.exit(0)\n"
    f"if {profile_rc}:\n"
    "  print('==ERROR== ERR_NVGPUCTRPERM', file=sys.stderr)\n"
    f"  sys.exit({profile_rc})\n"
    "i = a.index('-o')\n"
    "pathlib.Path(a[i + 1] + '.ncu-rep').write_text('report')\n"
    f"pathlib.Path({str(tmp_path / 'flags.txt')!r}).write_text(os.environ['XLA_FLAGS'])\n"
    "sys.exit(subprocess.call(a[i + 2:]))\n"
  )
  fake.chmod(0o755)
  return str(fake)


SMALL = ["--backend", "gpu_interpret", "--lengths", "32", "--tokens", "32"]


def test_it_runs_the_workload_under_ncu_and_writes_the_summary(tmp_path, monkeypatch):
  """With a stand-in for ncu: the workload runs op by op in a process of its own, and the JSON,
  the CSV and the report land where they were asked for."""
  import json

  raw = _raw_csv(("ns", "fib_attention_packed_fwd", "(2, 4, 2)", "(64, 1, 1)", "80,000",
                  "90", "200", "5", *["1"] * 6))  # fmt: skip
  fake = _fake_ncu(tmp_path, raw)
  monkeypatch.setattr(pk.shutil, "which", lambda name: fake)
  out = tmp_path / "res" / "ncu.json"
  pk.main([*SMALL, "--out", str(out)])
  report = json.loads(out.read_text())
  assert [r["kernel"] for r in report["launches"]] == ["fib_attention_packed_fwd"]
  assert report["launches"][0]["duration_us"] == 80.0 and report["lengths"] == [32]
  assert "--backend gpu_interpret" in report["command"]
  assert out.with_suffix(".csv").read_text() == raw
  assert out.with_suffix(".ncu-rep").read_text() == "report"
  assert "--xla_gpu_enable_command_buffer=" in (tmp_path / "flags.txt").read_text()


@pytest.mark.parametrize(
  "profile_rc, raw, argv, why",
  [
    (3, "", [], "ncu exited with 3 (its output above); nothing written"),
    (0, "==ERROR== No kernels were profiled.\n", [], "no ncu raw report (no ID column)"),
    (0, "", ["--report", "r.rep"], "--report r.rep: must end in .ncu-rep"),
  ],
)
def test_a_failed_profile_is_a_one_line_error_and_writes_nothing(
  tmp_path, monkeypatch, capsys, profile_rc, raw, argv, why
):
  fake = _fake_ncu(tmp_path, raw, profile_rc)
  monkeypatch.setattr(pk.shutil, "which", lambda name: fake)
  out = tmp_path / "res" / "ncu.json"
  with pytest.raises(SystemExit):
    pk.main([*SMALL, "--out", str(out), *argv])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("profile_kernels.py: error: ") and why in err, err
  assert not out.exists() and not out.with_suffix(".csv").exists()
