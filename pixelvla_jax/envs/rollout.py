"""Generic closed-loop runner: seeded episodes, chunked open-loop execution, reports.

An environment here is any object built as `env_cls(seed)` with

    env.image() -> uint8 [H, W, 3]          the current camera frame
    env.instruction: str                    the task instruction
    env.target_mask() -> [H, W] | None      the oracle mask of the target object
    env.step(action [7]) -> bool            applies one action (LIBERO convention); True = done
    env.done, env.success: bool
    env.max_steps: int
    env.chance: float (optional)            success rate of a policy that cannot tell the
                                            target from its look-alikes

`run_episodes` steps up to `batch_size` environments together: whenever an episode has no
planned actions left, it is given a new chunk from one batched `policy.act` call (`act_padded`,
shared with the LIBERO runner), and its first `replan` actions (the whole chunk by default)
are executed open loop, converted by `to_libero_actions` (also shared). `evaluate_policy`
runs the same seeded episodes once per prompt kind and writes results.json, a bar plot
(success.png, drawn with PIL) and a few rollout GIFs.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pixelvla_jax.data.normalization import open01_to_libero_gripper
from pixelvla_jax.models.observation import (
    PROMPT_BOX_BOTTOM_RIGHT,
    PROMPT_BOX_TOP_LEFT,
    PROMPT_LINE,
    PROMPT_NEGATIVE,
    PROMPT_POSITIVE,
)


def to_libero_actions(actions: np.ndarray, binarize: bool = True) -> np.ndarray:
    """[..., 7] policy actions (gripper 1 = open, 0 = closed) -> LIBERO's convention (gripper
    -1 open, +1 close), the gripper binarised to -1 / +1 by default as all public LIBERO
    evaluations do. Used by both runners (PixelRef's and LIBERO's)."""
    out = np.asarray(actions, np.float32).copy()
    out[..., -1] = open01_to_libero_gripper(out[..., -1], binarize=binarize)
    return out


def act_padded(
    policy: Any,
    images: Sequence[np.ndarray],
    instructions: Sequence[str],
    masks: Sequence[np.ndarray | None],
    prompt_kind: str,
    batch_size: int,
    seed: int,
    wrist_images: Sequence[np.ndarray] | None = None,
    states: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """One `policy.act` call on n <= batch_size samples, padded to `batch_size` rows so the
    policy compiles once -> [n, N_c, A] (the padding rows dropped).

    `wrist_images` / `states` (one per sample) are passed when the policy's run trained with
    them (`policy.uses_wrist_image` / `uses_state`); a run that needs one that the
    environment does not give fails in `policy.act` with the reason.

    Per sample the policy is given `prompt_kind` where its mask has pixels, else "none" (a
    None mask counts as empty). Visual prompts other than "mask" are sampled with (seed, row),
    i.e. they depend on the order of the rows.
    """
    n = len(images)
    if not 0 < n <= batch_size or len(instructions) != n or len(masks) != n:
        raise ValueError(
            f"act_padded: {n} images, {len(instructions)} instructions and {len(masks)} masks "
            f"for a batch of {batch_size}; give 1..batch_size of each."
        )
    shape = np.shape(images[0])[:2]
    masks = [np.zeros(shape, np.float32) if m is None else np.asarray(m, np.float32) for m in masks]
    kinds = [prompt_kind if m.any() else "none" for m in masks]
    pad = batch_size - n
    images = list(images) + [images[0]] * pad
    instructions = list(instructions) + [instructions[0]] * pad
    masks += [masks[0]] * pad
    kinds += [kinds[0]] * pad
    use_masks = any(k != "none" for k in kinds)
    extra = {}
    if wrist_images is not None and getattr(policy, "uses_wrist_image", False):
        extra["wrist_images"] = np.stack(list(wrist_images) + [wrist_images[0]] * pad)
    if states is not None and getattr(policy, "uses_state", False):
        extra["states"] = np.stack(list(states) + [states[0]] * pad)
    actions = policy.act(
        np.stack(images),
        instructions,
        np.stack(masks) if use_masks else None,
        kinds,
        seed=seed,
        **extra,
    )
    return np.asarray(actions)[:n]


def episode_seeds(seed: int, num_episodes: int) -> list[int]:
    """The evaluation's episode seeds (disjoint from training's small seeds for seed >= 1)."""
    return [int(seed) * 1_000_003 + k for k in range(num_episodes)]


def run_episodes(
    policy: Any,
    env_cls: Callable[[int], Any],
    seeds: Sequence[int],
    prompt_kind: str = "mask",
    *,
    replan: int = 0,
    batch_size: int = 50,
    record: Sequence[int] = (),
    to_env_action: Callable[[np.ndarray], np.ndarray] = to_libero_actions,
    prompt_seed: int = 0,
) -> list[dict]:
    """Runs one episode per seed with `policy` given `prompt_kind` inputs.

    Args:
      policy: has `act(images, instructions, pixel_masks, prompt_kinds, seed)` -> [B, N_c, 7]
        and `chunk_size`.
      env_cls: `env_cls(seed)` builds an environment (see module docstring).
      seeds: one episode per seed.
      prompt_kind: what the policy is given (see `pixelvla_jax.policy.PROMPT_KINDS`).
      replan: actions executed per predicted chunk (0 or > N_c: the whole chunk).
      batch_size: episodes stepped together; `policy.act` always sees this batch size
        (padded by `act_padded`), so it compiles once.
      record: indices (into `seeds`) of episodes whose frames are kept for GIFs.
      to_env_action: maps one policy action to the environment's convention.
      prompt_seed: seeds the visual prompts.
    Returns:
      one dict per episode: seed, success, steps, instruction, chance, outcome, frames and
      prompts (recorded episodes only: per frame, the prompt acted on, `given_prompt`).
    """
    chunk = int(policy.chunk_size)
    execute = chunk if replan <= 0 else min(replan, chunk)
    record = set(record)
    results: list[dict] = []
    for start in range(0, len(seeds), batch_size):
        group = list(range(start, min(start + batch_size, len(seeds))))
        envs = [env_cls(seeds[i]) for i in group]
        plans = [collections.deque() for _ in group]
        frames = {j: [envs[j].image()] for j, i in enumerate(group) if i in record}
        given = {j: [None] for j in frames}  # per recorded frame, the prompt acted on
        calls = 0
        while True:
            active = [j for j, env in enumerate(envs) if not env.done]
            if not active:
                break
            need = [j for j in active if not plans[j]]
            if need:
                call_seed = prompt_seed * 1_000_003 + start * 1_009 + calls
                images = [envs[j].image() for j in need]
                masks = [envs[j].target_mask() for j in need]
                actions = act_padded(
                    policy,
                    images,
                    [envs[j].instruction for j in need],
                    masks,
                    prompt_kind,
                    batch_size,
                    seed=call_seed,
                )
                calls += 1
                for k, j in enumerate(need):
                    plans[j].extend(actions[k, :execute])
                    if j in given:
                        given[j][-1] = given_prompt(
                            policy,
                            images[k],
                            envs[j].instruction,
                            masks[k],
                            prompt_kind,
                            call_seed,
                            k,
                        )
            for j in active:
                envs[j].step(to_env_action(plans[j].popleft()))
                if envs[j].done:
                    plans[j].clear()
                if j in frames:
                    frames[j].append(envs[j].image())
                    given[j].append(given[j][-1])
        for j, i in enumerate(group):
            env = envs[j]
            results.append(
                {
                    "seed": int(seeds[i]),
                    "success": bool(env.success),
                    "steps": int(env.steps),
                    "instruction": env.instruction,
                    "chance": float(getattr(env, "chance", float("nan"))),
                    "outcome": getattr(env, "outcome", None),
                    "frames": frames.get(j),
                    "prompts": given.get(j),
                }
            )
    return results


# ------------------------------------------------------------------ reports

# Overlay colours of the visual prompts drawn on rollout GIFs.
PROMPT_COLOURS = {
    "mask": (255, 0, 255),
    PROMPT_POSITIVE: (0, 230, 0),
    PROMPT_NEGATIVE: (255, 40, 40),
    PROMPT_LINE: (0, 220, 255),
    "box": (255, 150, 0),
}


def given_prompt(policy: Any, image, instruction, mask, prompt_kind: str, seed: int, row: int):
    """What `act_padded`'s row `row` of the call seeded `seed` was given, for drawing:
    {pixel_mask, prompt_points, prompt_types, prompt_mask} from the policy's own
    preprocessing (the same rng (seed, row)); None for a policy without `preprocess` (a
    served one)."""
    preprocess = getattr(policy, "preprocess", None)
    if preprocess is None:
        return None
    has = mask is not None and np.asarray(mask).any()
    obs = preprocess(
        np.asarray(image)[None],
        [instruction],
        np.asarray(mask, np.float32)[None] if has else None,
        [prompt_kind if has else "none"],
        seed=seed,
        first_index=row,
    )
    return {
        k: np.asarray(getattr(obs, k))[0]
        for k in ("pixel_mask", "prompt_points", "prompt_types", "prompt_mask")
    }


def draw_prompt(image: Image.Image, prompt: dict | None) -> Image.Image:
    """Draws a given prompt (`given_prompt`) onto an (upscaled) frame: mask outlines, points
    (positive green, negative red), the line's stroke and the box."""
    if prompt is None:
        return image
    w, h = image.size
    draw = ImageDraw.Draw(image)
    for key in ("pixel_mask", "prompt_mask"):
        m = np.asarray(prompt[key]) > 0.5
        if m.any():
            big = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h))) > 127
            inner = big.copy()
            inner[1:-1, 1:-1] &= big[:-2, 1:-1] & big[2:, 1:-1] & big[1:-1, :-2] & big[1:-1, 2:]
            rim = np.dstack([big & ~inner] * 3)
            frame = np.asarray(image).copy()
            np.copyto(frame, np.asarray(PROMPT_COLOURS["mask"], np.uint8), where=rim)
            image = Image.fromarray(frame)
            draw = ImageDraw.Draw(image)
    points = np.asarray(prompt["prompt_points"]) * (w, h)
    types = np.asarray(prompt["prompt_types"])
    line = [tuple(p) for p, t in zip(points, types) if t == PROMPT_LINE]
    if len(line) > 1:
        draw.line(line, fill=PROMPT_COLOURS[PROMPT_LINE], width=2)
    corners = {int(t): tuple(p) for p, t in zip(points, types)}
    if PROMPT_BOX_TOP_LEFT in corners and PROMPT_BOX_BOTTOM_RIGHT in corners:
        draw.rectangle(
            [corners[PROMPT_BOX_TOP_LEFT], corners[PROMPT_BOX_BOTTOM_RIGHT]],
            outline=PROMPT_COLOURS["box"],
            width=2,
        )
    for (x, y), t in zip(points, types):
        if t in (PROMPT_POSITIVE, PROMPT_NEGATIVE):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=PROMPT_COLOURS[int(t)], outline="white")
    return image


def save_gif(
    frames: Sequence[np.ndarray],
    path: str,
    scale: int = 4,
    ms: int = 150,
    prompts: Sequence[dict | None] | None = None,
) -> None:
    """Writes uint8 [H, W, 3] frames as an animated GIF, upscaled `scale` x (nearest), with
    the prompt given at each frame drawn on it (`prompts`, one per frame, optional)."""
    images = []
    for k, f in enumerate(frames):
        image = Image.fromarray(np.asarray(f, np.uint8)).resize(
            (f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST
        )
        images.append(draw_prompt(image, prompts[k] if prompts else None))
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)


_SPLIT_COLOURS = [(66, 133, 244), (251, 188, 5), (52, 168, 83), (150, 150, 150)]


def bar_plot(
    rates: dict[str, float] | dict[str, dict[str, float]],
    path: str,
    chance: float | None = None,
    title: str = "",
) -> None:
    """Success rate per prompt kind as a PNG bar chart (PIL only), chance as a dashed line.

    `rates`: {kind: rate}, or {split: {kind: rate}} for one bar per split in each kind's
    group (a legend names the splits)."""
    if rates and not isinstance(next(iter(rates.values())), dict):
        rates = {"": rates}
    splits = list(rates)
    kinds = list(dict.fromkeys(k for r in rates.values() for k in r))
    bar = 60 if len(splits) == 1 else max(16, 66 // len(splits))
    group = bar * len(splits) + 30
    width, height, left, bottom, top = 120 + group * len(kinds), 340, 50, 40, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    plot_h = height - bottom - top
    y_of = lambda v: height - bottom - v * plot_h  # noqa: E731
    draw.line([(left, top), (left, height - bottom), (width - 10, height - bottom)], "black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(tick)
        draw.line([(left - 4, y), (left, y)], "black")
        draw.text((5, y - 6), f"{int(tick * 100)}%", fill="black")
    palette = [(66, 133, 244), (52, 168, 83), (251, 188, 5), (234, 67, 53), (150, 150, 150)]
    for k, kind in enumerate(kinds):
        x0 = left + 20 + group * k
        for s, split in enumerate(splits):
            if kind not in rates[split]:
                continue
            rate = rates[split][kind]
            colour = palette[k % len(palette)] if len(splits) == 1 else _SPLIT_COLOURS[s % 4]
            xs = x0 + bar * s
            draw.rectangle([xs, y_of(rate), xs + bar - 2, y_of(0)], fill=colour)
            draw.text((xs + 1, y_of(rate) - 14), f"{rate * 100:.0f}", fill="black")
        draw.text((x0 + 5, height - bottom + 8), kind, fill="black")
    if len(splits) > 1:
        x = left
        for s, split in enumerate(splits):
            draw.rectangle([x, 30, x + 10, 40], fill=_SPLIT_COLOURS[s % 4])
            draw.text((x + 14, 29), split, fill="black")
            x += 24 + 7 * len(split)
    if chance is not None and np.isfinite(chance):
        y = y_of(chance)
        for x in range(left, width - 10, 10):
            draw.line([(x, y), (x + 5, y)], fill=(200, 0, 0))
        draw.text((width - 85, y - 14), f"chance {chance * 100:.0f}%", fill=(200, 0, 0))
    if title:
        draw.text((left, 10), title, fill="black")
    img.save(path)


def _evaluate_split(
    policy, env_cls, seeds, prompt_kinds, replan, batch_size, record, prompt_seed, out_dir, tag
) -> dict:
    """One environment (split): {success, outcomes, chance_rate, episodes} per prompt kind;
    recorded episodes are written as GIFs `<tag><kind>_<seed>.gif` into `out_dir`."""
    out: dict[str, Any] = {"success": {}, "episodes": {}}
    chances: list[float] = []
    for kind in prompt_kinds:
        episodes = run_episodes(
            policy,
            env_cls,
            seeds,
            kind,
            replan=replan,
            batch_size=batch_size,
            record=record,
            prompt_seed=prompt_seed,
        )
        out["success"][kind] = float(np.mean([e["success"] for e in episodes]))
        ends = [e["outcome"] for e in episodes if e["outcome"] is not None]
        if ends:
            out.setdefault("outcomes", {})[kind] = {o: ends.count(o) for o in sorted(set(ends))}
        chances = [e["chance"] for e in episodes]
        for e in episodes:
            frames, given = e.pop("frames"), e.pop("prompts", None)
            if frames and out_dir:
                save_gif(
                    frames, os.path.join(out_dir, f"{tag}{kind}_{e['seed']}.gif"), prompts=given
                )
        out["episodes"][kind] = episodes
    out["chance_rate"] = float(np.mean(chances)) if chances else float("nan")
    return out


def evaluate_policy(
    policy: Any,
    env_cls: Callable[[int], Any],
    num_episodes: int = 50,
    prompt_kinds: Sequence[str] = ("mask", "points", "box", "line", "none"),
    *,
    replan: int = 0,
    seed: int = 7,
    out_dir: str = "",
    videos: int = 2,
    batch_size: int = 50,
    title: str = "",
    split: str = "",
    more_splits: Mapping[str, Callable[[int], Any]] | None = None,
) -> dict:
    """Success rate per prompt kind over the same `num_episodes` seeded episodes.

    Returns {"num_episodes", "seed", "replan", "chance_rate", "success": {kind: rate},
    "episodes": {kind: [{seed, success, steps, instruction, chance, outcome}]}} and, for
    environments with an `outcome` (PixelRef), "outcomes": {kind: {outcome: count}}.
    `more_splits` ({name: env_cls}) are evaluated on the same seeds and kinds: then
    "splits" holds {name: {success, outcomes, chance_rate}} for `split` (the name of
    `env_cls`'s, the top-level figures) and each of them, with their "episodes". With
    `out_dir`, also writes results.json, success.png (one bar per split in each kind's
    group) and `videos` GIFs per kind of the first split (<kind>_<seed>.gif), the prompt
    given drawn on each frame.
    """
    seeds = episode_seeds(seed, num_episodes)
    record = range(min(videos, num_episodes)) if out_dir else ()
    batch_size = max(1, min(batch_size, num_episodes))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    first = _evaluate_split(
        policy, env_cls, seeds, prompt_kinds, replan, batch_size, record, seed, out_dir, ""
    )
    results: dict[str, Any] = {
        "num_episodes": num_episodes,
        "seed": seed,
        "replan": replan,
        **first,
    }
    if more_splits:
        summary = ("success", "outcomes", "chance_rate")
        results["splits"] = {split or "default": {k: first[k] for k in summary if k in first}}
        for name, split_env in more_splits.items():
            results["splits"][name] = _evaluate_split(
                policy, split_env, seeds, prompt_kinds, replan, batch_size, (), seed, "", ""
            )
    if out_dir:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        rates = (
            {name: r["success"] for name, r in results["splits"].items()}
            if more_splits
            else results["success"]
        )
        bar_plot(rates, os.path.join(out_dir, "success.png"), results["chance_rate"], title)
    return results


def format_table(results: dict) -> str:
    """A console table of success per prompt kind (and the chance rate); with several
    splits (`evaluate_policy`'s more_splits) one success column per split, and how each
    split's failed episodes ended."""
    n = results["num_episodes"]
    splits = results.get("splits")
    if not splits:
        splits = {
            "": {k: results[k] for k in ("success", "outcomes", "chance_rate") if k in results}
        }
    names = list(splits)
    width = max(10, *(len(s) + 2 for s in names))
    header = f"{'prompt':<10}" + "".join(f"{s or 'success':>{width}}" for s in names)
    lines = [
        f"{header}  how failed episodes ended ({n} episodes per cell)",
        "-" * (len(header) + 30),
    ]
    for kind in results["success"]:
        cells, ends = "", []
        for name in names:
            rate = splits[name]["success"].get(kind)
            cells += f"{rate * 100:>{width - 1}.1f}%" if rate is not None else " " * width
            failed = {
                o: c
                for o, c in splits[name].get("outcomes", {}).get(kind, {}).items()
                if o != "target"
            }
            ends.append(", ".join(f"{o} {c}" for o, c in failed.items()) or "-")
        ends_text = ends[0] if len(names) == 1 else " | ".join(ends)
        lines.append(f"{kind:<10}{cells}  {ends_text}".rstrip())
    chances = [splits[s].get("chance_rate") for s in names]
    if any(c is not None and np.isfinite(c) for c in chances):
        lines.append(
            f"{'chance':<10}"
            + "".join(
                f"{c * 100:>{width - 1}.1f}%" if c is not None and np.isfinite(c) else " " * width
                for c in chances
            )
        )
    return "\n".join(lines)
