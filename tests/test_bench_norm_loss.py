"""experiments/bench_norm_loss.py on CPU (the kernels through their interpreter): what it
times, the ratios it reports and its argument checks (the GPU numbers come from a device)."""

import json

import jax.numpy as jnp
import pytest

from experiments import bench_norm_loss


def test_report_times_each_pass_and_states_the_ratios(tmp_path, monkeypatch):
  monkeypatch.setattr(bench_norm_loss, "copy_bandwidth", lambda: 1e11)
  out = tmp_path / "r.json"
  report = bench_norm_loss.main(
    ["--tokens", "64", "--d-model", "32", "--vocab", "300", "--interpret",
     "--lse-blocks", "1,128,2", "2,64,2", "--out", str(out)]
  )  # fmt: skip
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  ms = report["ms"]
  assert set(ms) == {
    "norm_fwd_xla", "norm_fwd_bwd_xla", "norm_fwd_pallas", "norm_fwd_bwd_pallas",
    "lse_two_pass", "lse_online", "lse_pallas_1_128_2", "lse_pallas_2_64_2",
  }  # fmt: skip
  s = report["summary"]
  assert s["lse_pallas_default_vs_two_pass"] == pytest.approx(
    ms["lse_pallas_1_128_2"] / ms["lse_two_pass"]
  )
  assert s["lse_pallas_best"] == min(("1_128_2", "2_64_2"), key=lambda k: ms[f"lse_pallas_{k}"])
  assert s["norm_fwd_bwd_pallas_vs_xla"] == pytest.approx(
    ms["norm_fwd_bwd_pallas"] / ms["norm_fwd_bwd_xla"]
  )
  # every kernel computed what the two passes did
  assert max(report["lse_max_abs_diff_vs_two_pass"].values()) < 1e-4
  # floors: x in and y out forward; x, the two cotangents in and dx out on top backward
  row = 2 * 64 * 32
  assert report["hbm_floor_ms"]["norm_fwd_bwd"] == pytest.approx(6 * row / 1e11 * 1e3)


@pytest.mark.parametrize(
  "argv, match",
  [
    (["--tokens", "0"], "--tokens=0"),
    (["--vocab", "-1"], "--vocab=-1"),
    (["--lse-blocks", "1,128"], "--lse-blocks '1,128' must be rows,chunk,stages"),
    (["--tokens", "8", "--vocab", "64", "--interpret", "--lse-blocks", "1,100,2"], "chunk=100"),
  ],
)
def test_bad_arguments_are_refused(argv, match, capsys):
  with pytest.raises(SystemExit):
    bench_norm_loss.main(argv)
  assert match in capsys.readouterr().err


def test_the_xla_norm_is_the_models_formula():
  x = jnp.arange(12.0).reshape(3, 4)
  step = bench_norm_loss._norm_forward("xla", interpret=True)
  want = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  assert jnp.allclose(step(x, jnp.ones(4)), want, rtol=1e-6)
