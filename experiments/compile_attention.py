"""Where a sparse train step's extra compile time goes: the attention of a paper model's layers
alone (forward and backward of each layer's `attention.attend` with `pallas_packed`, the
layers chained as in the model; a learned run's alphas, one a layer at the model's initial 1,
differentiated too), traced, lowered, compiled and run once, timed apart, in one fresh
process.

  python experiments/compile_attention.py [--run fib_stagger_w12] [--seq-len 1024]
      [--batch 32] [--layers 16] [--blocks SPEC] [--out FILE] [--interpret]

One JSON line (and FILE, written whole or not at all, where given): trace_s, lower_s,
compile_s, first_call_s (a kernel compiled when first run shows here), second_call_s, the
distinct attention kernels in the lowered module, the blocks given (`blocks`) and those the
packed kernels run with (`gpu_blocks`, a spec). Each configuration its own process, so that
no in-process cache of an earlier one helps it (`for s in A B; do python ... --blocks $s; done`).
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.paper import get_config  # noqa: E402
from fibax import attention, cli  # noqa: E402
from fibax.data.files import atomic_write_json  # noqa: E402
from fibax.model import layer_patterns  # noqa: E402
from kernels_pallas.gpu import SPEC_FORMAT, GpuBlocks, blocks_spec, parse_blocks  # noqa: E402


def measure(
  run: str, seq_len: int, batch: int, layers: int, blocks: GpuBlocks | None, interpret=False
) -> dict:
  """`blocks`: the kernels' (None: the machine's default, as a model with no `gpu_blocks`)."""
  cfg = get_config(run).model
  pats = layer_patterns(cfg, seq_len)[:layers]
  heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (batch, seq_len, heads, dim), jnp.bfloat16)
  k, v = (jax.random.normal(x, (batch, seq_len, kv_heads, dim), jnp.bfloat16) for x in ks[1:])
  alphas = jnp.ones((len(pats),), jnp.float32)  # learned layers' (static ones take none)
  impl = "pallas_packed_interpret" if interpret else "pallas_packed"

  def loss(q, k, v, alphas):
    x = q
    for i, p in enumerate(pats):  # each layer's output is the next one's queries
      x = attention.attend(x, k, v, p, impl, cfg.attention.dense_impl, alphas[i])
    return jnp.sum(x.astype(jnp.float32))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  args = (q, k, v, alphas)
  t0 = time.perf_counter()
  with attention.gpu_blocks(blocks):  # read when tracing
    traced = step.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  t4 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  t5 = time.perf_counter()
  names = sorted(set(re.findall(r"fib_attention_\w+", lowered.as_text())))
  return {
    "run": run,
    "impl": impl,
    "seq_len": seq_len,
    "batch": batch,
    "layers": len(pats),
    "trace_s": round(t1 - t0, 3),
    "lower_s": round(t2 - t1, 3),
    "compile_s": round(t3 - t2, 3),
    "first_call_s": round(t4 - t3, 3),
    "second_call_s": round(t5 - t4, 4),
    "kernels": names,
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="compile_attention.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--run", default="fib_stagger_w12", help="a configs/paper.py run")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--layers", type=int, default=16, help="the model's first N layers")
  p.add_argument(
    "--blocks", default=None, help=f"GpuBlocks, {SPEC_FORMAT} (default: this machine's default)"
  )
  p.add_argument("--out", default=None)
  p.add_argument("--interpret", action="store_true", help="Pallas' interpreters (a CPU check)")
  args = p.parse_args(argv)
  try:
    blocks = None if args.blocks is None else parse_blocks(args.blocks)
  except ValueError as e:
    p.error(f"--blocks: {e}")
  if min(args.seq_len, args.batch, args.layers) < 1:
    p.error(f"--seq-len {args.seq_len}, --batch {args.batch}, --layers {args.layers}: >= 1")
  try:
    get_config(args.run)
  except ValueError as e:
    p.error(f"--run: {e}")
  cli.set_xla_defaults()
  found = measure(args.run, args.seq_len, args.batch, args.layers, blocks, args.interpret)
  with attention.gpu_blocks(blocks):
    used = attention.gpu_blocks_for("gpu_interpret" if args.interpret else "gpu", "packed")
  found |= {
    "blocks": args.blocks,
    "gpu_blocks": blocks_spec(used),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
  }
  print(json.dumps(found), flush=True)
  if args.out:
    atomic_write_json(args.out, found)


if __name__ == "__main__":
  main()
