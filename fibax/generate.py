"""Text generation in memory that does not grow with the context for sparse models.

    from fibax.generate import generate
    out = generate(run.params, run.cfg.model, [[5, 17, 9], [4, 4]], max_new_tokens=64,
                   temperature=0.8, top_k=50, seed=0)
    out.tokens  # one list of new token ids per prompt (ending at EOS if one was drawn)

A sparse layer looks back at most max(D_l) positions (round(alpha * 987) for Fibonacci K = 15:
1,480 at alpha 1.5), so each layer keeps a ring of max(D_l) + 1 keys and values: position p
lives in row p mod size, and decoding position p reads the rows (p - d) mod size for d in D_l
(only where p - d >= 0). A dense layer keeps an ordinary cache as long as the text.

The prompt runs through the model's own forward (the training kernels) once; its keys
(after RoPE, at their absolute positions) and values fill each layer's cache. Then one jitted
`lax.while_loop` decodes a token per step for every row until each row has drawn EOS or
`max_new_tokens`. Prompts of different lengths are batched: row b decodes at its own position.

Patterns: a Fibonacci layer's rungs stop growing once the run length passes its largest rung,
so decoding uses the pattern at the full length (prompt + new tokens), which equals the
training pattern of every position. pow2's base grows with the length it is built at
(the paper): past the training length, generation builds pow2 patterns at the training
length (cap_mode "train"), as the trained model saw them. Learned schedules decode frozen
(`fibax.evaluate.freeze`): their alphas rounded into static patterns.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fibax import model as model_lib
from fibax.config import ModelConfig
from fibax.data.tokenizer import EOS_ID


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: list[list[int]]  # the new tokens of each prompt
  logits: np.ndarray | None  # [B, max_new_tokens, V] float32, with return_logits=True


def generation_config(params, cfg: ModelConfig) -> ModelConfig:
  """The config generation decodes with: learned alphas frozen, pow2 built at training length."""
  att = cfg.attention
  if att.schedule == "learned" and att.frozen_alphas is None:
    from fibax.evaluate import freeze

    cfg = freeze(params, cfg)
  if att.base == "pow2" and att.schedule != "dense":
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, cap_mode="train"))
  return cfg


def cache_layout(cfg: ModelConfig, total_len: int) -> list[tuple[int, np.ndarray | None]]:
  """Per layer: (cache rows, distances int32[N]) of a sparse layer, (total_len, None) of a
  dense one."""
  layout = []
  for pattern in model_lib.layer_patterns(cfg, total_len):
    if pattern.window >= total_len - 1 and not pattern.far:
      layout.append((total_len, None))
    else:
      d_N = np.concatenate([np.arange(pattern.window + 1), np.asarray(pattern.far, int)])
      layout.append((int(d_N.max()) + 1, d_N.astype(np.int32)))
  return layout


def _sample(logits_BxV, rng, temperature: float, top_k: int, top_p: float):
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest set of tokens whose probability reaches top_p (at least one).
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    cutoff_Bx1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), -1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _fill_cache(kv_BxPxKxD, lengths_B, rows: int, distances) -> jnp.ndarray:
  """The cache after the prompt: a ring's row s holds the last prompt position = s (mod rows)."""
  if distances is None:  # dense: row = position
    pad = rows - kv_BxPxKxD.shape[1]
    return jnp.pad(kv_BxPxKxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
  last_B = lengths_B - 1
  s_R = jnp.arange(rows)
  pos_BxR = last_B[:, None] - jnp.mod(last_B[:, None] - s_R[None, :], rows)
  rows_BxRxKxD = jnp.take_along_axis(
    kv_BxPxKxD, jnp.clip(pos_BxR, 0)[:, :, None, None], axis=1, mode="clip"
  )
  return jnp.where((pos_BxR >= 0)[:, :, None, None], rows_BxRxKxD, 0).astype(kv_BxPxKxD.dtype)


def _decode_layer(cfg, p, x_Bx1xE, pos_B, cache, rows: int, distances):
  """One layer for one token a row; returns (x, updated (k, v) cache)."""
  dtype = jnp.dtype(cfg.compute_dtype)
  dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=dtype, param_dtype=jnp.float32)
  h = model_lib.RMSNorm(cfg.norm_eps, dtype).apply({"params": p["attn_norm"]}, x_Bx1xE)
  a = p["attn"]
  q_Bx1xHxD = dense((cfg.num_heads, cfg.head_dim)).apply({"params": a["query"]}, h)
  k_Bx1xKxD = dense((cfg.num_kv_heads, cfg.head_dim)).apply({"params": a["key"]}, h)
  v_Bx1xKxD = dense((cfg.num_kv_heads, cfg.head_dim)).apply({"params": a["value"]}, h)
  q_Bx1xHxD = model_lib.rope(q_Bx1xHxD, cfg.rope_theta, pos_B[:, None])
  k_Bx1xKxD = model_lib.rope(k_Bx1xKxD, cfg.rope_theta, pos_B[:, None])

  b_B = jnp.arange(pos_B.shape[0])
  slot_B = pos_B if distances is None else jnp.mod(pos_B, rows)
  k_cache = cache[0].at[b_B, slot_B].set(k_Bx1xKxD[:, 0])
  v_cache = cache[1].at[b_B, slot_B].set(v_Bx1xKxD[:, 0])
  if distances is None:
    k_BxNxKxD, v_BxNxKxD = k_cache, v_cache
    valid_BxN = jnp.arange(rows)[None, :] <= pos_B[:, None]
  else:
    back_BxN = pos_B[:, None] - jnp.asarray(distances)[None, :]
    idx_BxN = jnp.mod(back_BxN, rows)
    k_BxNxKxD = k_cache[b_B[:, None], idx_BxN]
    v_BxNxKxD = v_cache[b_B[:, None], idx_BxN]
    valid_BxN = back_BxN >= 0

  groups = cfg.num_heads // cfg.num_kv_heads
  q_BxKxGxD = q_Bx1xHxD[:, 0].reshape(-1, cfg.num_kv_heads, groups, cfg.head_dim)
  s_BxKxGxN = jnp.einsum(
    "bkgd,bnkd->bkgn", q_BxKxGxD, k_BxNxKxD, preferred_element_type=jnp.float32
  ) / np.sqrt(cfg.head_dim)
  s_BxKxGxN = jnp.where(valid_BxN[:, None, None, :], s_BxKxGxN, -jnp.inf)
  w_BxKxGxN = jax.nn.softmax(s_BxKxGxN, axis=-1)
  o_BxKxGxD = jnp.einsum(
    "bkgn,bnkd->bkgd", w_BxKxGxN.astype(v_BxNxKxD.dtype), v_BxNxKxD,
    preferred_element_type=jnp.float32,
  )  # fmt: skip
  o_Bx1xHxD = o_BxKxGxD.reshape(-1, 1, cfg.num_heads, cfg.head_dim).astype(dtype)
  out = nn.DenseGeneral(
    cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=jnp.float32
  ).apply({"params": a["out"]}, o_Bx1xHxD)
  x_Bx1xE = x_Bx1xE + out
  h = model_lib.RMSNorm(cfg.norm_eps, dtype).apply({"params": p["mlp_norm"]}, x_Bx1xE)
  x_Bx1xE = x_Bx1xE + model_lib.SwiGLU(cfg).apply({"params": p["mlp"]}, h)
  return x_Bx1xE, (k_cache, v_cache)


def decode_step(p, cfg: ModelConfig, layout, token_B, pos_B, caches):
  """The logits after token_B at positions pos_B, and the caches with its keys and values
  written: one token a row through every layer. `p` is the unboxed params, `layout` the
  `cache_layout`, caches a (k, v) pair a layer of [B, rows, kv heads, D]."""
  dtype = jnp.dtype(cfg.compute_dtype)
  embedding_VxE = p["embed"]["embedding"].astype(dtype)
  x_Bx1xE = embedding_VxE[token_B][:, None, :]
  new_caches = []
  for layer, (rows, distances) in enumerate(layout):
    x_Bx1xE, cache = _decode_layer(
      cfg, p[f"layer_{layer}"], x_Bx1xE, pos_B, caches[layer], rows, distances
    )
    new_caches.append(cache)
  x_Bx1xE = model_lib.RMSNorm(cfg.norm_eps, dtype).apply({"params": p["final_norm"]}, x_Bx1xE)
  # The model's output layer: logits in `ModelConfig.logits_dtype`, read as float32.
  logits_Bx1xV = model_lib.output_logits(x_Bx1xE, embedding_VxE, dtype=model_lib.logits_dtype(cfg))
  return logits_Bx1xV[:, 0].astype(jnp.float32), tuple(new_caches)


@functools.partial(
  jax.jit,
  static_argnames=(
    "cfg",
    "max_new",
    "temperature",
    "top_k",
    "top_p",
    "eos_id",
    "return_logits",
    "on_token",
  ),
)
def _generate(params, prompts_BxP, lengths_B, rng, *, cfg, max_new, temperature, top_k, top_p,
              eos_id, return_logits, on_token=None):  # fmt: skip
  batch, prompt_len = prompts_BxP.shape
  total = prompt_len + max_new
  p = nn.unbox(params)
  layout = cache_layout(cfg, total)

  logits_Bx1xV, state = model_lib.Transformer(cfg).apply(
    {"params": params}, prompts_BxP, lengths_B - 1, mutable=["intermediates"]
  )
  caches = []
  for layer, (rows, distances) in enumerate(layout):
    (k_BxPxKxD, v_BxPxKxD) = state["intermediates"][f"layer_{layer}"]["attn"]["kv"][0]
    caches.append(tuple(_fill_cache(t, lengths_B, rows, distances) for t in (k_BxPxKxD, v_BxPxKxD)))
  b_B = jnp.arange(batch)
  first_logits_BxV = logits_Bx1xV[:, 0]
  rng, key = jax.random.split(rng)
  first_B = _sample(first_logits_BxV, key, temperature, top_k, top_p)
  tokens_BxN = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompts_BxP)
  tokens_BxN = tokens_BxN.at[b_B, lengths_B].set(first_B)
  logits_BxMxV = jnp.zeros((batch, max_new if return_logits else 0, cfg.vocab_size), jnp.float32)
  if return_logits:
    logits_BxMxV = logits_BxMxV.at[:, 0].set(first_logits_BxV)
  count_B = jnp.ones((batch,), jnp.int32)
  done_B = (first_B == eos_id) | (count_B >= max_new)
  if on_token is not None:
    jax.debug.callback(on_token, first_B, jnp.ones((batch,), bool), ordered=True)

  def body(carry):
    tokens_BxN, pos_B, count_B, done_B, caches, logits_BxMxV, rng = carry
    logits_BxV, new_caches = decode_step(p, cfg, layout, tokens_BxN[b_B, pos_B], pos_B, caches)
    rng, key = jax.random.split(rng)
    next_B = _sample(logits_BxV, key, temperature, top_k, top_p)
    live_B = ~done_B
    if on_token is not None:  # streamed to the host as drawn, in order
      jax.debug.callback(on_token, next_B, live_B, ordered=True)
    write_B = jnp.where(live_B, pos_B + 1, pos_B)  # done rows rewrite what they hold
    tokens_BxN = tokens_BxN.at[b_B, write_B].set(
      jnp.where(live_B, next_B, tokens_BxN[b_B, write_B])
    )
    if return_logits:
      slot_B = jnp.minimum(count_B, max_new - 1)
      logits_BxMxV = logits_BxMxV.at[b_B, slot_B].set(
        jnp.where(live_B[:, None], logits_BxV, logits_BxMxV[b_B, slot_B])
      )
    count_B = count_B + live_B
    done_B = done_B | (live_B & ((next_B == eos_id) | (count_B >= max_new)))
    return tokens_BxN, write_B, count_B, done_B, tuple(new_caches), logits_BxMxV, rng

  carry = (tokens_BxN, lengths_B, count_B, done_B, tuple(caches), logits_BxMxV, rng)
  carry = jax.lax.while_loop(lambda c: ~jnp.all(c[3]), body, carry)
  return carry[0], carry[2], carry[5]


def generate(
  params,
  cfg: ModelConfig,
  prompt_tokens: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int = EOS_ID,
  return_logits: bool = False,
  on_token=None,
) -> Generation:
  """New tokens for each prompt: greedy at temperature 0, else sampled (top-k / top-p).

  Each row stops at EOS (kept as its last token) or after `max_new_tokens`. `on_token`, if
  given, is called on the host with (tokens int32[B], live bool[B]) as each step draws them.
  """
  if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
    raise ValueError("every prompt needs at least one token")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"{temperature=} and {top_k=} must be >= 0 and {top_p=} in (0, 1]")
  for p in prompt_tokens:
    if min(p) < 0 or max(p) >= cfg.vocab_size:
      raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got {min(p)}..{max(p)}")
  lengths = np.array([len(p) for p in prompt_tokens], np.int32)
  # Right-padded (causal: padding never reaches a prompt position) to at least W + 1 tokens,
  # the shortest sequence a windowed pattern is defined for.
  width = max(int(lengths.max()), cfg.attention.window + 1)
  prompts = np.zeros((len(prompt_tokens), width), np.int32)
  for b, p in enumerate(prompt_tokens):
    prompts[b, : len(p)] = p
  gen_cfg = generation_config(params, cfg)
  tokens_BxN, count_B, logits = _generate(
    params,
    jnp.asarray(prompts),
    jnp.asarray(lengths),
    jax.random.key(seed),
    cfg=gen_cfg,
    max_new=max_new_tokens,
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
    eos_id=int(eos_id),
    return_logits=return_logits,
    on_token=on_token,
  )
  tokens_BxN, count_B = np.asarray(tokens_BxN), np.asarray(count_B)
  new = [
    tokens_BxN[b, n : n + c].tolist() for b, (n, c) in enumerate(zip(lengths, count_B, strict=True))
  ]
  return Generation(tokens=new, logits=np.asarray(logits) if return_logits else None)


# --- CLI -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  """python -m fibax.generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] ..."""
  import sys
  import time

  from fibax import cli
  from fibax.checkpoint import CheckpointError
  from fibax.data.files import DataError
  from fibax.data.tokenizer import load_tokenizer
  from fibax.evaluate import run_data_dir
  from fibax.restore import load_run

  cli.set_xla_defaults()
  p = cli.Parser(prog="python -m fibax.generate", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run's workdir or checkpoint directory")
  p.add_argument("--prompt", required=True, help="text; encoded with the run's tokenizer")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None, help="the run's prepared data (its tokenizer)")
  try:
    args = p.parse_args(argv)
    if not args.prompt.strip():
      raise ValueError("--prompt is empty")
    if args.max_new_tokens < 1:
      raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    run = load_run(args.checkpoint)
    sp = load_tokenizer(run_data_dir(run.cfg, args.data_dir))
    prompt = sp.encode(args.prompt)
    if not prompt:
      raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens")
    out = []

    def stream(tokens_B, live_B):
      if bool(live_B[0]):
        out.append(int(tokens_B[0]))
        # Decoding the whole text each time keeps multi-piece characters whole.
        text = sp.decode(out)
        sys.stdout.write(text[stream.shown :])
        sys.stdout.flush()
        stream.shown = len(text)

    stream.shown = 0
    start = time.perf_counter()
    generate(
      run.params,
      run.cfg.model,
      [prompt],
      args.max_new_tokens,
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
      seed=args.seed,
      on_token=stream,
    )
    seconds = time.perf_counter() - start
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 2
  except (CheckpointError, DataError, ValueError, FileNotFoundError) as e:
    return cli.fail(p.prog, e, cli.BAD_INPUT)
  print(
    f"\n[{len(out)} tokens in {seconds:.2f} s, {len(out) / seconds:.1f} tokens/s including "
    "compilation]",
    file=sys.stderr,
  )
  return 0


if __name__ == "__main__":
  import sys

  sys.exit(main())
