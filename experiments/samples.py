"""Samples from trained runs: continuations of held-out books, and for sparse runs one
continuation after a prompt longer than 64K tokens, decoded in memory that does not grow.

    python experiments/samples.py --runs runs/fib_stagger_w12 runs/dense \\
        --out experiments/results/gpu_full_recipe/samples

For each run, `--num-samples` prompts of `--prompt-tokens` tokens are taken from the middle of
the first validation books long enough to hold them (the same prompts for every run) and
continued by `fibax.generate` for `--new-tokens` tokens (one batched call; the book's own next
tokens are kept beside them). A sparse run also continues the first `--long-context` tokens of
the longest validation book that holds them. Every call records its seconds to the first new
token (prefill and compilation) and its tokens/s after it, and the cache `fibax.generate`
holds. Writes samples.json and samples.md in --out, after every run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments.bench_attention import versions
from fibax import cli
from fibax.checkpoint import CheckpointError
from fibax.data.files import DataError, atomic_path, atomic_write_json
from fibax.data.shards import SplitTokens
from fibax.data.tokenizer import load_tokenizer
from fibax.evaluate import run_data_dir
from fibax.generate import cache_layout, generate, generation_config
from fibax.restore import load_run


def book_prompts(tokens: SplitTokens, count: int, prompt_len: int, new_tokens: int):
  """(prompt, the book's next tokens) from the middle of the first `count` books that hold
  them, in book order."""
  bounds = tokens.doc_bounds
  out = []
  for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
    if end - begin < 2 * (prompt_len + new_tokens):
      continue
    start = int(begin + (end - begin) // 2)
    text = tokens.read(start, prompt_len + new_tokens).astype(np.int64).tolist()
    out.append((text[:prompt_len], text[prompt_len:]))
    if len(out) == count:
      break
  return out


def long_prompt(tokens: SplitTokens, length: int):
  """The first `length` tokens of the longest book, or None if no book holds them."""
  bounds = tokens.doc_bounds
  lengths = np.diff(bounds)
  longest = int(np.argmax(lengths))
  if lengths[longest] < length:
    return None
  return tokens.read(int(bounds[longest]), length).astype(np.int64).tolist()


def timed_generate(run, prompts, new_tokens: int, args) -> dict:
  """Tokens of one batched `generate` call, seconds to the first new token and tokens/s after
  it (every row's tokens), and the bytes of the cache it held."""
  stamps = []

  def on_token(tokens_B, live_B):
    stamps.append((time.perf_counter(), int(np.sum(live_B))))

  start = time.perf_counter()
  out = generate(
    run.params, run.cfg.model, prompts, new_tokens, temperature=args.temperature,
    top_p=args.top_p, seed=args.seed, on_token=on_token,
  )  # fmt: skip
  gen_cfg = generation_config(run.params, run.cfg.model)
  rows = [rows for rows, _ in cache_layout(gen_cfg, max(map(len, prompts)) + new_tokens)]
  kv_bytes = 2 * gen_cfg.num_kv_heads * gen_cfg.head_dim * np.dtype(gen_cfg.compute_dtype).itemsize
  after = sum(n for _, n in stamps[1:])
  steady_s = stamps[-1][0] - stamps[0][0] if len(stamps) > 1 else 0.0
  return {
    "tokens": out.tokens,
    "first_token_s": round(stamps[0][0] - start, 3),
    "tokens_per_s_after_first": round(after / steady_s, 1) if steady_s > 0 else None,
    "cache_rows_per_layer": rows,
    "cache_bytes": int(len(prompts) * sum(rows) * kv_bytes),
  }


def run_samples(run_dir: str, args, log) -> dict:
  run = load_run(run_dir)
  data_dir = run_data_dir(run.cfg, args.data_dir)
  sp = load_tokenizer(data_dir)
  tokens = SplitTokens(data_dir, "validation")
  pairs = book_prompts(tokens, args.num_samples, args.prompt_tokens, args.new_tokens)
  if not pairs:
    raise ValueError(
      f"{data_dir}: no validation book holds 2 x ({args.prompt_tokens} + {args.new_tokens}) tokens"
    )
  schedule = run.cfg.model.attention.schedule
  result = {"run": run.label, "step": run.step, "schedule": schedule}
  books = timed_generate(run, [p for p, _ in pairs], args.new_tokens, args)
  result["books"] = {k: v for k, v in books.items() if k != "tokens"}
  result["books"]["samples"] = [
    {"prompt": sp.decode(p), "model": sp.decode(new), "book": sp.decode(ref)}
    for (p, ref), new in zip(pairs, books["tokens"], strict=True)
  ]
  log(f"{run.label}: {len(pairs)} samples, {books['tokens_per_s_after_first']} tokens/s")
  if schedule != "dense" and args.long_context:
    prompt = long_prompt(tokens, args.long_context)
    if prompt is None:
      result["long"] = {"status": f"skipped: no validation book holds {args.long_context} tokens"}
    else:
      long = timed_generate(run, [prompt], args.new_tokens, args)
      result["long"] = {k: v for k, v in long.items() if k != "tokens"}
      result["long"].update(
        status="ok",
        prompt_tokens=len(prompt),
        prompt_tail=sp.decode(prompt[-args.prompt_tokens :]),
        model=sp.decode(long["tokens"][0]),
      )
      log(f"{run.label}: {len(prompt)}-token prompt, first token {long['first_token_s']} s")
  return result


def markdown(report: dict) -> str:
  lines = ["# Samples from trained runs", "", f"`{report['command']}`", ""]
  lines.append(
    f"Sampling: temperature {report['temperature']}, top-p {report['top_p']}, seed "
    f"{report['seed']}; {report['new_tokens']} new tokens after {report['prompt_tokens']}-token "
    f"prompts from the middle of held-out books. Device: {report['versions']['device']}."
  )
  for r in report["runs"]:
    b = r["books"]
    lines += [
      "", f"## {r['run']} (step {r['step']})", "",
      f"{b['tokens_per_s_after_first']} tokens/s after the first token ({len(b['samples'])} rows"
      f" at once), first token after {b['first_token_s']} s including compilation; cache "
      f"{b['cache_bytes'] / 2**20:.1f} MiB.",
    ]  # fmt: skip
    for i, s in enumerate(b["samples"], 1):
      lines += [
        "", f"### Sample {i}", "", "**Prompt:**", "", f"> {s['prompt']}", "",
        "**Model:**", "", f"> {s['model']}", "", "**The book:**", "", f"> {s['book']}",
      ]  # fmt: skip
    long = r.get("long")
    if long and long["status"] == "ok":
      lines += [
        "", f"### After {long['prompt_tokens']:,} tokens of one book", "",
        f"First token after {long['first_token_s']} s (prefill and compilation), then "
        f"{long['tokens_per_s_after_first']} tokens/s; cache {long['cache_bytes'] / 2**20:.1f} MiB"
        f" (largest layer {max(long['cache_rows_per_layer'])} rows).", "",
        "**The prompt's last tokens:**", "", f"> {long['prompt_tail']}", "",
        "**Model:**", "", f"> {long['model']}",
      ]  # fmt: skip
    elif long:
      lines += ["", f"Long context: {long['status']}."]
  return "\n".join(lines).replace("\n> \n", "\n>\n") + "\n"


def main(argv: list[str] | None = None) -> int:
  cli.set_xla_defaults()  # as `python -m fibax.train` runs: cuBLAS matmuls, XLA's sort (GPU)
  p = cli.Parser(prog="experiments/samples.py", description=__doc__.split("\n")[0])
  p.add_argument("--runs", nargs="+", required=True, help="run workdirs or checkpoint dirs")
  p.add_argument("--out", required=True, help="folder for samples.json and samples.md")
  p.add_argument("--data-dir", default=None, help="the runs' prepared data (default: theirs)")
  p.add_argument("--num-samples", type=int, default=4)
  p.add_argument("--prompt-tokens", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--long-context", type=int, default=65536 + 1024, help="0: none")
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("num_samples", "prompt_tokens", "new_tokens"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report = {
    "command": " ".join(["python", "experiments/samples.py", *(argv or sys.argv[1:])]),
    "versions": versions(),
    **{k: getattr(args, k) for k in ("temperature", "top_p", "seed", "prompt_tokens")},
    "new_tokens": args.new_tokens,
    "runs": [],
  }
  for run_dir in args.runs:
    try:
      report["runs"].append(run_samples(run_dir, args, lambda m: print(m, flush=True)))
    except (CheckpointError, DataError, ValueError) as e:
      return cli.fail(p.prog, e, cli.BAD_INPUT)
    atomic_write_json(out / "samples.json", report)
    with atomic_path(out / "samples.md") as tmp:
      tmp.write_text(markdown(report))
  print(f"wrote {out / 'samples.json'} and samples.md on {jax.devices()[0].device_kind}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
