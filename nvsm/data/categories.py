"""Object categories nvsm knows. ``ObjectRecord`` rejects any other name (typos, garbage fields).

The registry starts with the 12 rigid PASCAL3D+ classes and the 100 ObjectNet3D classes. Readers
register extra names they find in a dataset's own class list (ObjectNet3D's
``Image_sets/classes.txt``, a synthetic dataset's manifest) with ``register_categories``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "OBJECTNET3D_CATEGORIES",
    "PASCAL3D_CATEGORIES",
    "is_known_category",
    "known_categories",
    "register_categories",
]

#: The 12 rigid PASCAL3D+ classes (also the classes of Occluded PASCAL3D+); KITTI cars map to "car".
PASCAL3D_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "boat", "bottle", "bus", "car",
    "chair", "diningtable", "motorbike", "sofa", "train", "tvmonitor",
)

#: The 100 ObjectNet3D classes, spelled as in the release's ``Image_sets/classes.txt``.
OBJECTNET3D_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "ashtray", "backpack", "basket", "bed", "bench", "bicycle", "blackboard", "boat",
    "bookshelf", "bottle", "bucket", "bus", "cabinet", "calculator", "camera", "can", "cap", "car",
    "cellphone", "chair", "clock", "coffee_maker", "comb", "computer", "cup", "desk_lamp",
    "diningtable", "dishwasher", "door", "eraser", "eyeglasses", "fan", "faucet", "filing_cabinet",
    "fire_extinguisher", "fish_tank", "flashlight", "fork", "guitar", "hair_dryer", "hammer",
    "headphone", "helmet", "iron", "jar", "kettle", "key", "keyboard", "knife", "laptop",
    "lighter", "mailbox", "microphone", "microwave", "motorbike", "mouse", "paintbrush", "pan",
    "pen", "pencil", "piano", "pillow", "plate", "pot", "printer", "racket", "refrigerator",
    "remote_control", "rifle", "road_pole", "satellite_dish", "scissors", "screwdriver", "shoe",
    "shovel", "sign", "skate", "skateboard", "slipper", "sofa", "speaker", "spoon", "stapler",
    "stove", "suitcase", "teapot", "telephone", "toaster", "toilet", "toothbrush", "train",
    "trash_bin", "trophy", "tub", "tvmonitor", "vending_machine", "washing_machine", "watch",
    "wheelchair",
)

_KNOWN: set[str] = set(PASCAL3D_CATEGORIES) | set(OBJECTNET3D_CATEGORIES)


def register_categories(names: Iterable[str]) -> None:
    """Add category names (non-empty, no whitespace) to the registry; idempotent."""
    for name in names:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"category names must be non-empty and space-free, got {name!r}")
        _KNOWN.add(name)


def is_known_category(name: object) -> bool:
    """Whether ``name`` is a registered category."""
    return isinstance(name, str) and name in _KNOWN


def known_categories() -> tuple[str, ...]:
    """All registered categories, sorted."""
    return tuple(sorted(_KNOWN))
