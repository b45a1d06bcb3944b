"""Configs from `configs/*.py` files and `section.field=value` overrides.

load_config("configs/paper.py:fib_stagger_w12")        # get_config("fib_stagger_w12")
load_config("configs/paper.py:fib_fixed_w8,steps=3052")
apply_overrides(cfg, ["train.total_steps=100", "model.attention.impl=pallas"])
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

from fibax.config import RunConfig


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: a string


def load_config(spec: str) -> RunConfig:
  """`path/to/file.py[:arg,key=value,...]` -> that file's `get_config(arg, key=value, ...)`."""
  path, _, args = spec.partition(":")
  if not Path(path).is_file():
    raise FileNotFoundError(f"config file {path!r} not found (from --config {spec!r})")
  module_spec = importlib.util.spec_from_file_location(f"_fibax_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} has no get_config()")
  positional, keywords = [], {}
  for part in filter(None, args.split(",")):
    key, eq, value = part.partition("=")
    if eq:
      keywords[key.strip()] = _literal(value.strip())
    else:
      positional.append(_literal(part.strip()))
  cfg = module.get_config(*positional, **keywords)
  if not isinstance(cfg, RunConfig):
    raise TypeError(f"{path}: get_config() returned {type(cfg).__name__}, not RunConfig")
  return cfg


def _replace(obj, names: list[str], text: str, full: str):
  fields = {f.name for f in dataclasses.fields(obj)}
  if names[0] not in fields:
    raise ValueError(f"override {full!r}: {type(obj).__name__} has no field {names[0]!r}")
  current = getattr(obj, names[0])
  if len(names) > 1:
    if not dataclasses.is_dataclass(current):
      raise ValueError(f"override {full!r}: {names[0]!r} is not a section")
    value = _replace(current, names[1:], text, full)
  else:
    value = _literal(text)
    if isinstance(current, str) and not isinstance(value, str):
      value = text  # a string field takes the text as written (e.g. "16,4,16,4", not a tuple)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if current is not None and value is not None and type(value) is not type(current):
      raise ValueError(
        f"override {full!r}: expected {type(current).__name__} like {current!r}, "
        f"got {type(value).__name__}"
      )
  return dataclasses.replace(obj, **{names[0]: value})


def add_overrides_argument(parser, help: str = "override config fields") -> None:
  """`--set SECTION.FIELD=VALUE ...` into `args.overrides` (for `apply_overrides`)."""
  parser.add_argument(
    "--set",
    dest="overrides",
    nargs="+",
    action="extend",
    default=[],
    metavar="SECTION.FIELD=VALUE",
    help=f"{help}, e.g. train.total_steps=100 model.attention.impl=pallas",
  )


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
  """Each `a.b.c=value` (value a Python literal or a bare string) replaces one field."""
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq or not key:
      raise ValueError(f"override {item!r} is not of the form section.field=value")
    cfg = _replace(cfg, key.strip().split("."), text.strip(), item)
  return cfg
