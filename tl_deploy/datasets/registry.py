"""The data sets ``tl-deploy datasets NAME`` can write: name -> prepare function.

Every prepare function takes ``(out, *, seed, val_fraction, test_fraction, wheel, cache_dir, force)``
and returns the ImageFolder folder it wrote (or found up to date).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tl_deploy.datasets.animal_shape import prepare_animal_shape
from tl_deploy.datasets.animal_shape_m import prepare_animal_shape_m
from tl_deploy.datasets.animal_shape_sketch import prepare_animal_shape_sketch

DATASETS: dict[str, Callable[..., Path]] = {
    "animal-shape": prepare_animal_shape,  # the default data: 10 classes of 28x28 silhouettes
    "animal-shape-m": prepare_animal_shape_m,  # domain-adaptation target: the same split, blended with photos
    "animal-shape-sketch": prepare_animal_shape_sketch,  # second target: the same split, pencil outlines
}
