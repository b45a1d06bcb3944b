"""experiments/profile_sources.py: a profile traced inside command buffers gets its sources
from the program's HLO dump, by kernel name, and its top rows' kinds."""

import gzip
import json
import re

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_sources


def _program(x):
  return jnp.tanh(x @ x).sum()


def test_rows_get_the_source_of_the_instruction_their_kernel_is_named_after(tmp_path):
  text = jax.jit(_program).lower(jnp.ones((32, 32))).compile().as_text()
  # An instruction with a ".N" suffix and metadata: its kernel would be named "<name>_N".
  names = re.findall(r"^\s*(?:ROOT )?%?([\w-]+\.\d+) = .*op_name=", text, re.M)
  assert names, text
  inst = names[0]
  kernel = inst.replace(".", "_")
  result = {
    "command": "x",
    "results": [
      {"run": "dense", "seq_len": 8, "profile_top": [
        {"op": kernel, "ms_per_step": 2.0, "hlo_op": "command_buffer_1"},
        {"op": "nvjet_sm90_tst_NNT", "ms_per_step": 1.0, "hlo_op": "command_buffer_1"},
      ]},
      {"run": "fib", "seq_len": 8, "profile_top": [{"op": kernel, "ms_per_step": 1.0}]},
    ],
  }  # fmt: skip
  (tmp_path / "r.json").write_text(json.dumps(result))
  with gzip.open(tmp_path / "p.txt.gz", "wt") as f:
    f.write(text)
  out = tmp_path / "named.json"
  profile_sources.main(
    [str(tmp_path / "r.json"), "--hlo", f"dense@8={tmp_path / 'p.txt.gz'}", "--out", str(out)]
  )
  named = json.loads(out.read_text())["results"]
  top = named[0]["profile_top"]
  assert "_program" in top[0]["source"] and "source" not in top[1]
  kinds = named[0]["profile_kinds_top"]
  assert kinds["device"] == 3.0 and kinds["matmul"] == 1.0  # nvjet: a matmul by its name
  assert named[1] == result["results"][1]  # no HLO given for that run: as it was


@pytest.mark.parametrize(
  "hlo, why",
  [("dense@9=F", "no such run"), ("dense@8=missing.txt", "no file"), ("dense=F", "RUN@SEQ_LEN")],
)
def test_a_bad_hlo_pair_is_named(tmp_path, capsys, hlo, why):
  (tmp_path / "r.json").write_text(json.dumps({"results": [{"run": "dense", "seq_len": 8}]}))
  (tmp_path / "F").write_text("")
  hlo = hlo.replace("=F", f"={tmp_path / 'F'}")
  out = tmp_path / "out.json"
  with pytest.raises(SystemExit):
    profile_sources.main([str(tmp_path / "r.json"), "--hlo", hlo, "--out", str(out)])
  assert why in capsys.readouterr().err and not out.exists()
