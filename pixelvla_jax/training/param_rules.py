"""Regex policies over parameter paths: which parameters train, which decay.

A parameter's path is its keys joined by "/", e.g. `params/llm/layers/attn/q/kernel`.
Policies are lists of `(regex, label)` pairs from the config; the first regex that
*fully matches* a path decides (`re.fullmatch`, so write `.*bias` not `bias`). A rule that
matches no parameter is an error: a typo must not silently train (or freeze) everything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

TRAINED = "trained"
FROZEN = "frozen"
LABELS = (TRAINED, FROZEN)

# Parameters that get no weight decay: biases, norm scales, embeddings, LayerScale gammas,
# learned tokens / positional embeddings.
DEFAULT_NO_DECAY = (
    r"(.*/)?bias",
    r"(.*/)?(scale|gamma|scale_factor)",
    r".*(norm|ln_|LayerNorm|RMSNorm)[^/]*/[^/]+",
    r"(.*/)?embedding",
    r"(.*/)?[^/]*(pos_embed|cls_token|reg_token|mask_token|absent)[^/]*",
)


def _key_str(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        # `value` is the field of flax's `nn.Partitioned` box: not part of the param's name.
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """`(DictKey('a'), DictKey('b'), SequenceKey(0))` -> `"a/b/0"` (flax box `value` skipped)."""
    return "/".join(s for s in map(_key_str, path) if s is not None)


def param_paths(params: Any) -> list[str]:
    """All parameter paths of a tree, in flattening order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compile(rules: Sequence[Sequence[Any]], what: str) -> list[tuple[re.Pattern, Any, str]]:
    compiled = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"{what} rule {rule!r} is not a (regex, value) pair.")
        pattern, value = rule
        try:
            compiled.append((re.compile(pattern), value, pattern))
        except re.error as e:
            raise ValueError(f"{what} rule regex {pattern!r} does not compile: {e}") from e
    return compiled


def match_rules(
    params: Any,
    rules: Sequence[Sequence[Any]],
    default: Any,
    *,
    what: str = "Policy",
    require_all_used: bool = True,
) -> Any:
    """Tree with the structure of `params`: per leaf, the value of the first fully matching rule.

    Args:
      params: parameter pytree (dicts of arrays or ShapeDtypeStructs).
      rules: `[(regex, value), ...]`; first match wins.
      default: the value for paths that no rule matches.
      what: name used in error messages.
      require_all_used: raise if some rule matches no parameter at all.
    """
    compiled = _compile(rules, what)
    used = [False] * len(compiled)

    def one(path, _):
        name = path_str(path)
        for i, (regex, value, _pattern) in enumerate(compiled):
            if regex.fullmatch(name):
                used[i] = True
                return value
        return default

    out = jax.tree_util.tree_map_with_path(one, params)
    if require_all_used:
        # A rule shadowed by an earlier one also counts as matching: check it on its own.
        paths = param_paths(params)
        for regex, _value, pattern in compiled:
            if not any(regex.fullmatch(p) for p in paths):
                examples = ", ".join(paths[:5])
                raise ValueError(
                    f"{what} rule {pattern!r} matched no parameter; check the regex (it must "
                    f"match the whole path). Parameter paths look like: {examples}"
                )
    return out


def param_labels(params: Any, rules: Sequence[Sequence[str]], default: str = TRAINED) -> Any:
    """Labels in {"trained", "frozen"} per parameter, for `optax.multi_transform`.

    Example rules: `[(r"params/vision/.*", "frozen"), (r".*lora.*", "trained"),
    (r"params/llm/.*", "frozen")]` with default "trained".
    """
    for _pattern, label in rules:
        if label not in LABELS:
            raise ValueError(f"Freeze rule label {label!r} is not one of {LABELS}.")
    if default not in LABELS:
        raise ValueError(f"Default label {default!r} is not one of {LABELS}.")
    return match_rules(params, rules, default, what="Freeze")


def weight_decay_mask(
    params: Any, no_decay: Sequence[str] = DEFAULT_NO_DECAY, *, require_all_used: bool = False
) -> Any:
    """Bool tree: True where weight decay applies (not matched by any `no_decay` regex)."""
    rules = [(pattern, False) for pattern in no_decay]
    return match_rules(
        params, rules, True, what="No-weight-decay", require_all_used=require_all_used
    )
