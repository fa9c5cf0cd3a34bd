"""Convert a TFRecord RLDS dataset to ArrayRecord (random access), then build its step index.

    python -m pixelvla_jax.data.convert --dataset_dir=/data/libero_spatial_no_noops/1.0.0
    python -m pixelvla_jax.data.convert --dataset_dir=DIR --out_dir=OUT --build_index

Wraps TFDS's own `convert_format` (the same as `tfds convert_format
--out_file_format=array_record`), which parses TFRecords and therefore needs TensorFlow: install
the `convert` extra (`pip install -e '.[convert]'`, i.e. tensorflow-cpu) on the machine that
converts. Training machines need neither TensorFlow nor this step once the data is converted.
Without --out_dir the ArrayRecord shards are written next to the TFRecord ones and
dataset_info.json lists them as an alternative format (which is what `rlds.open_rlds` reads).
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from pixelvla_jax.data import rlds
from pixelvla_jax.errors import MissingDependencyError


def convert_to_array_record(
    dataset_dir: str,
    out_dir: str | None = None,
    overwrite: bool = False,
    num_workers: int = 4,
) -> str:
    """Converts `dataset_dir` (a version folder, or a dataset folder with versions) in place or
    into `out_dir`; returns the folder to read the converted dataset from."""
    if importlib.util.find_spec("tensorflow") is None:
        raise MissingDependencyError(
            "converting TFRecord datasets needs TensorFlow (TFDS parses TFRecords with it): "
            "pip install -e '.[convert]' (or `pip install tensorflow-cpu`), then rerun "
            f"`{rlds.CONVERT_COMMAND.format(dir=dataset_dir)}`"
        )
    from tensorflow_datasets.scripts.cli import convert_format_utils

    dataset_dir = os.path.abspath(dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise rlds.DatasetNotFoundError(f"dataset directory {dataset_dir} does not exist")
    is_version_dir = os.path.isfile(os.path.join(dataset_dir, "dataset_info.json"))
    convert_format_utils.convert_dataset(
        out_dir=out_dir,
        out_file_format="array_record",
        dataset_dir=None if is_version_dir else dataset_dir,
        dataset_version_dir=dataset_dir if is_version_dir else None,
        overwrite=overwrite,
        num_workers=num_workers,
    )
    return out_dir or dataset_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True, help="TFDS dataset (version) folder")
    parser.add_argument("--out_dir", default=None, help="write converted dataset here")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument(
        "--build_index", action="store_true", help="also build the step-level cache"
    )
    parser.add_argument("--name", default=None, help="registry name (default: the TFDS name)")
    parser.add_argument("--cache_dir", default=None, help="step-index cache root")
    args = parser.parse_args(argv)
    try:
        version_dir = rlds.resolve_version_dir(args.dataset_dir)
        rlds.check_random_access(version_dir)
        print(f"{version_dir} already has ArrayRecord files; nothing to convert.")
        target = version_dir
    except rlds.DatasetFormatError:
        target = convert_to_array_record(
            args.dataset_dir, args.out_dir, args.overwrite, args.num_workers
        )
        print(f"converted {args.dataset_dir} to ArrayRecord in {target}")
    if args.build_index:
        from pixelvla_jax.data.step_index import build_step_index

        path, built = build_step_index(target, name=args.name, cache_dir=args.cache_dir)
        print(f"step index {'built' if built else 'already present'}: {path}")
    return 0


if __name__ == "__main__":
    from pixelvla_jax import cli

    cli.run(main, absl_flags=False)
