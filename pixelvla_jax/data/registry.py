"""Per-dataset standardisation of raw RLDS steps into the project's sample schema.

A `DatasetSpec` says where each standard field lives in a dataset's raw RLDS steps
("/"-separated feature paths inside a step or an episode) and how to standardise it:

  image         <- image_key (encoded frame)          wrist_image <- wrist_image_key (optional)
  proprio       <- concat(proprio_keys) float32 [P]  (P may be 0)
  action        <- concat(action_keys) float32 [7] = (dpos 3, drot 3, gripper), gripper then
                   mapped by `trajectory.standardize_gripper(gripper_convention)` to 1 open/0 closed
  instruction   <- instruction_key (text)
  annotations   <- the `annotations.py` feature keys (absent features = not annotated)

`action_normalization_mask` is True on the action dims that BOUNDS_Q99 normalises (not the
gripper). Look specs up with `get_spec(name)`; add project datasets with `register_spec`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from pixelvla_jax.data import annotations as ann
from pixelvla_jax.data.trajectory import GRIPPER_CONVENTIONS

EEF_ACTION_MASK = (True, True, True, True, True, True, False)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read and standardise one RLDS dataset (see module docstring)."""

    name: str
    image_key: str
    action_keys: tuple[str, ...]
    instruction_key: str
    gripper_convention: str
    wrist_image_key: str | None = None
    proprio_keys: tuple[str, ...] = ()
    action_normalization_mask: tuple[bool, ...] = EEF_ACTION_MASK
    episode_id_key: str | None = "episode_metadata/file_path"
    episode_mask_key: str | None = ann.EPISODE_MASK_KEY
    step_mask_key: str | None = ann.STEP_MASK_KEY
    object_name_key: str | None = ann.OBJECT_NAME_KEY
    gripper_box_key: str | None = ann.GRIPPER_BOX_KEY
    has_annotation_key: str | None = ann.HAS_ANNOTATION_KEY
    referred_mask_key: str | None = ann.REFERRED_MASK_KEY

    def __post_init__(self):
        if self.gripper_convention not in GRIPPER_CONVENTIONS:
            raise ValueError(
                f"dataset {self.name!r}: unknown gripper_convention {self.gripper_convention!r};"
                f" known: {GRIPPER_CONVENTIONS}"
            )

    @property
    def action_dim(self) -> int:
        return len(self.action_normalization_mask)

    def fingerprint(self) -> str:
        """Stable hash of the standardisation (part of cache keys)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _libero(name: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        image_key="observation/image",
        wrist_image_key="observation/wrist_image",
        proprio_keys=("observation/state",),
        action_keys=("action",),
        instruction_key="language_instruction",
        gripper_convention="libero",
    )


def _bridge(name: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        image_key="observation/image_0",
        proprio_keys=("observation/state",),
        action_keys=("action",),
        instruction_key="language_instruction",
        gripper_convention="bridge",
    )


def _fractal(name: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        image_key="observation/image",
        proprio_keys=("observation/base_pose_tool_reached", "observation/gripper_closed"),
        action_keys=(
            "action/world_vector",
            "action/rotation_delta",
            "action/gripper_closedness_action",
        ),
        instruction_key="observation/natural_language_instruction",
        gripper_convention="fractal",
        episode_id_key=None,
    )


_FORMATS = {"libero": _libero, "bridge": _bridge, "fractal": _fractal}

_REGISTRY: dict[str, DatasetSpec] = {}


def register_spec(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    """Adds a dataset's spec to the registry (e.g. a new generated dataset)."""
    if spec.name in _REGISTRY and not overwrite and _REGISTRY[spec.name] != spec:
        raise ValueError(f"a different spec for dataset {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def spec_for_format(fmt: str, name: str) -> DatasetSpec:
    """The standardisation of a raw format ("libero", "bridge", "fractal") under a new name."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown RLDS format {fmt!r}; known: {sorted(_FORMATS)}")
    return _FORMATS[fmt](name)


for _name in (
    "libero_spatial_no_noops",
    "libero_object_no_noops",
    "libero_goal_no_noops",
    "libero_10_no_noops",
    "libero_90_no_noops",
):
    register_spec(_libero(_name))
register_spec(_fractal("fractal20220817_data"))
register_spec(_bridge("bridge_orig"))
register_spec(_bridge("bridge_dataset"))
# The project's generated datasets (generate.py, the PixelRef environment, LIBERO replays).
register_spec(_libero("synthetic_libero"))
register_spec(_bridge("synthetic_bridge"))
register_spec(_fractal("synthetic_fractal"))
register_spec(_libero("pixelref"))


def known_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The registered spec of dataset `name`; unknown names raise KeyError listing known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset name {name!r}. Known datasets: {', '.join(known_names())}. "
            "Register a new one with pixelvla_jax.data.registry.register_spec(DatasetSpec(...)) "
            "or spec_for_format('libero'|'bridge'|'fractal', name)."
        ) from None
