"""Typed configuration: dataclasses filled from named YAML recipes and ``key=value`` overrides.

A recipe is a YAML file in ``recipes/`` (or any path) whose nested mapping mirrors the
dataclasses below; keys it leaves out keep their defaults, unknown keys are an error naming the
file and the key. ``nvsm recipes list`` / ``nvsm recipes show NAME`` expose them on the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

# A string setting's choices are a ``Literal`` type, spelled once: by the module that owns them
# where config can import it, here for the modules that import config (few-shot loop,
# matching, inference). ``_check_type`` rejects any other value when a config is loaded.
from nvsm.data.datasets import DatasetName
from nvsm.data.splits import Strategy
from nvsm.data.synth import SynthSize
from nvsm.errors import ConfigError, check_choice, short_repr
from nvsm.models.common import STRIDE
from nvsm.pose.camera import CropProtocol
from nvsm.render.rasterizer import RasterizerName
from nvsm.train.loss import NearMode, SampleMode

ScheduleName = Literal["fast", "reference"]  # nvsm.infer.solve.SCHEDULES
MatcherName = Literal["torch", "faiss"]  # nvsm.fewshot.loop.make_matcher
FaissIndexType = Literal["flat", "ivf"]  # nvsm.fewshot.matching.FaissMatcher
ScoreArea = Literal["silhouette", "usable"]  # nvsm.fewshot.estep.view_areas
MStepInit = Literal["continue", "restart"]  # nvsm.fewshot.loop

T = TypeVar("T")

#: Where named recipes live: the repository's ``recipes/`` folder (beside the package).
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class Bounds:
    """Where a number (each item, for a list; ``None`` passes) may lie. It is attached to a
    field's type with ``Annotated`` and checked on every load (``load_config``) and by
    ``check_config``, so that a bad value fails naming its key, before any work."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, x: float) -> bool:
        """Whether ``x`` lies within every bound set."""
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def __str__(self) -> str:
        ops = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        # A whole bound printed whole: a seed's limit read 4.29497e+09 in ``g`` format.
        parts = [f"{op} {int(v) if float(v).is_integer() else format(v, 'g')}"
                 for op, v in ops if v is not None]
        return "a value " + " and ".join(parts)


@dataclass(frozen=True)
class NonEmpty:
    """Marks a list setting that needs at least one item. Checked on every load, as ``Bounds``
    are."""

    def admits(self, value: list[Any]) -> bool:
        """Whether ``value`` has an item."""
        return len(value) > 0

    def __str__(self) -> str:
        return "at least one item"


@dataclass(frozen=True)
class Distinct:
    """Marks a list setting whose items name things once each (``data.categories [car, car]``
    read every record twice). Checked on every load, as ``Bounds`` are."""

    def admits(self, value: list[Any]) -> bool:
        """Whether no item of ``value`` is given twice."""
        return len(set(value)) == len(value)

    def __str__(self) -> str:
        return "each item once"


@dataclass(frozen=True)
class ImageSize:
    """Marks an (H, W) list setting: two items, each a multiple of ``multiple_of`` (the
    backbone's feature stride, so that a crop maps onto whole feature cells). Checked on every
    load, as ``Bounds`` are."""

    multiple_of: int

    def admits(self, value: list[int]) -> bool:
        """Whether ``value`` is two multiples of ``multiple_of``."""
        return len(value) == 2 and all(x % self.multiple_of == 0 for x in value)

    def __str__(self) -> str:
        return f"(H, W): two multiples of {self.multiple_of}"


@dataclass(frozen=True)
class AbsolutePath:
    """Marks a path setting: loading stores it absolute (``~`` expanded, a relative path taken
    from the working directory), so that the config a run records works from any folder."""


PathSetting = Annotated[str, AbsolutePath()]
PositiveInt = Annotated[int, Bounds(ge=1)]
NonNegativeInt = Annotated[int, Bounds(ge=0)]
PositiveFloat = Annotated[float, Bounds(gt=0)]
NonNegativeFloat = Annotated[float, Bounds(ge=0)]
UnitFloat = Annotated[float, Bounds(ge=0, le=1)]  # a probability, weight or momentum
Fraction = Annotated[float, Bounds(gt=0, le=1)]  # a non-empty share


@dataclass
class DataConfig:
    """Which images, which objects, how they are cropped."""

    dataset: DatasetName = "synthetic"
    root: PathSetting | None = None  # None: the built-in synthetic dataset (made on demand)
    # CAD/<category> for the cuboids; None: root (KITTI: the PASCAL3D+ release's)
    cad_root: PathSetting | None = None
    # Occluded PASCAL3D+ release (images/, annotations/, lists/) for test levels 1-3 of
    # PASCAL3D+-layout sets; None: <root>/OccludedPASCAL3D (where the synthetic set has it)
    occluded_root: PathSetting | None = None
    categories: Annotated[list[str], NonEmpty(), Distinct()] = field(
        default_factory=lambda: ["car"]
    )
    crop_protocol: CropProtocol = "gt-normalized"
    # None: the per-category default
    crop_size: Annotated[list[PositiveInt], ImageSize(STRIDE)] | None = None
    synth_size: SynthSize = "default"  # the built-in dataset only
    crop_scale: PositiveFloat = 1.0  # crops and normalised focal ×this (1 = NeMo's 3000 px)

    def crop_hw(self) -> tuple[int, int] | None:
        """``crop_size`` as an (H, W) tuple; None for the per-category default."""
        if self.crop_size is None:
            return None
        h, w = self.crop_size
        return h, w


@dataclass
class ModelConfig:
    """Backbone and neural mesh."""

    backbone: str = "efficientnet-lite0"
    backbone_weights: PathSetting | None = None
    feature_dim: PositiveInt = 128
    n_vertices: Annotated[int, Bounds(ge=8)] = 1000
    rasterizer: RasterizerName = "auto"
    channels_last: bool = True  # NHWC convolutions, faster on CPU (set_memory_format)


@dataclass
class AugmentConfig:
    """Training augmentations (``nvsm.train.cropset``); each keeps the camera exact."""

    flip: bool = True
    color_jitter: UnitFloat = 0.3
    scale_jitter: Annotated[float, Bounds(ge=0, lt=1)] = 0.1
    translate_jitter: UnitFloat = 0.05
    occluders: UnitFloat = 0.0  # probability of pasting one occluder per image


@dataclass
class TrainConfig:
    """NeMo contrastive training of the backbone and the vertex feature banks."""

    steps: PositiveInt = 600
    batch_size: PositiveInt = 8
    lr_head: NonNegativeFloat = 1e-3
    lr_backbone: NonNegativeFloat = 1e-4
    weight_decay: NonNegativeFloat = 1e-4
    warmup_steps: NonNegativeInt = 20
    bank_momentum: UnitFloat = 0.9
    clutter_size: PositiveInt = 512
    clutter_per_image: NonNegativeInt = 16
    temperature: PositiveFloat = 0.07
    clutter_weight: NonNegativeFloat = 5e-3
    regulariser_weight: NonNegativeFloat = 0.1
    near_mode: NearMode = "3d"  # 3d: object-space radius | 2d: projected radius (the reference's)
    near_radius: NonNegativeFloat = 0.1  # 3d: object units; vertices this close are not negatives
    near_radius_px: NonNegativeFloat = 6.0  # 2d: feature cells (the reference's 48 px at stride 8)
    sample_mode: SampleMode = "bilinear"
    checkpoint_every: PositiveInt = 200
    amp: bool = True  # mixed precision on CUDA only
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LabelConfig:
    """Which training images keep their pose labels (few-shot settings)."""

    annotations: PositiveInt | None = None  # None: every training image is labelled
    anchors: Strategy = "stratified"  # over azimuth


@dataclass
class InferConfig:
    """Render-and-compare inference (``nvsm.infer``)."""

    schedule: ScheduleName = "fast"
    batch_size: PositiveInt = 16


@dataclass
class FewShotConfig:
    """The NVSM EM loop (``nvsm fewshot``, ``nvsm.fewshot.loop``).

    Round 0 trains NeMo on the labelled anchors (``train.steps``); each EM round k = 1..rounds
    synthesises views of the anchors (labels + the previous round's accepted pseudo-labels) on
    ``expanding_shift_grid(k − 1)``, matches them to the unlabelled images, refines the
    matched poses, accepts by a linearly loosened rule and retrains for ``mstep_steps``.
    """

    rounds: PositiveInt = 2
    mstep_steps: PositiveInt = 300
    mstep_init: MStepInit = "continue"  # restart: from the labelled-only model
    occlusion_levels: Annotated[
        list[Annotated[int, Bounds(ge=0, le=3)]], NonEmpty(), Distinct()
    ] = field(default_factory=lambda: [0])
    unlabelled_limit: PositiveInt | None = None  # None: every unlabelled training image
    max_pseudo_anchors: NonNegativeInt = 64  # accepted pseudo-labels reused as anchors (the surest)
    shift_step_deg: PositiveFloat = 10.0
    shift_base_deg: NonNegativeFloat = 30.0
    shift_growth_deg: NonNegativeFloat = 30.0
    shift_elevations_deg: Annotated[list[float], NonEmpty()] = field(
        default_factory=lambda: [-10.0, 0.0, 10.0]
    )
    shift_thetas_deg: Annotated[list[float], NonEmpty()] = field(  # in-plane Δθ
        default_factory=lambda: [0.0]
    )
    matcher: MatcherName = "torch"
    faiss_index: FaissIndexType = "flat"  # with fewshot.matcher=faiss
    faiss_nlist: PositiveInt = 64
    faiss_nprobe: PositiveInt = 8
    faiss_pca_dim: PositiveInt | None = None  # compress view/target encodings (re-scored exactly)
    faiss_gpu: bool = False  # needs faiss-gpu (extra `gpu`) and a visible GPU
    clutter_aware: bool = True
    # Denominator of the NVSM score (nvsm.fewshot.matching): the view's whole silhouette, holes
    # included (default), or only its usable pixels (the score before it, which lets mostly-hole
    # views from large shifts win matches).
    score_area: ScoreArea = "silhouette"
    # CSLS hubness correction of the score (nvsm.fewshot.matching): s − r_m / 2, r_m the mean of
    # view m's hubness_k best scores over (up to hubness_sample, evenly spaced) pool images.
    hubness_k: NonNegativeInt = 0  # 0: off
    hubness_sample: PositiveInt = 4096
    candidates: PositiveInt = 64  # top-k views kept per image (margin and flip score among them)
    view_chunk: PositiveInt = 512  # views synthesised and matched per chunk (memory bound)
    target_chunk: PositiveInt = 1024  # unlabelled feature maps read and matched per chunk
    min_separation_deg: Annotated[float, Bounds(gt=0, le=180)] = 30.0
    refine_steps: NonNegativeInt = 10  # render-and-compare steps on each accepted match (0: none)
    refine_lr: NonNegativeFloat = 0.05
    accept_top_fraction_first: Fraction = 0.3  # EM round 1 accepts this top fraction of the pool,
    accept_top_fraction_step: NonNegativeFloat = 0.2  # + this per later round,
    accept_top_fraction_max: Fraction = 0.6  # up to this (independent of ``rounds``: resumable)
    accept_min_margin: float | None = None
    accept_min_flip_margin: float | None = None
    accept_rank_with_flip: bool = True  # rank the top fraction by score and flip margin
    accept_flip_rank_weight: PositiveFloat = 1.0  # the flip margin's weight in that ranking
    accept_score_rank_weight: NonNegativeFloat = 1.0  # the score's weight (0: flip margin alone)
    accept_azimuth_bins: PositiveInt = 1  # > 1: the top fraction per bin of the pseudo-pose azimuth
    min_weight: UnitFloat = 0.1  # floor of a pseudo-label's confidence weight
    mirror_anchors: bool = True  # add every anchor's mirror image (mirrored pose) to the views
    # Image-level view synthesis in the EM M-steps (NVSM and self-training alike): every
    # labelled and accepted image is also trained on re-rendered at its pose + Δa for each of
    # these azimuth shifts (the cuboid textured with the image; synthesize_images). Empty: off
    # (the default: it trades occluded accuracy for L0 and helps both loops alike; README).
    mstep_image_shifts_deg: list[float] = field(default_factory=list)
    baselines: bool = True  # also run nemo_same_steps and self_training (same budget)
    oracle: bool = False  # also train on every training image's ground truth (--with-oracle)


@dataclass
class RunConfig:
    """Everything a run needs; sub-configs are filled by the commands that use them."""

    name: str = "custom"
    description: str = ""
    # Below 2**32, as numpy's legacy seeds: the streams nvsm derives from it (per round, rank
    # and category) stay within torch's 64-bit seeds, which refused 2**64 deep inside a run.
    seed: Annotated[int, Bounds(ge=0, le=2**32 - 1)] = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)


#: A plain decimal number, exponent allowed (no inf/nan words, no underscores).
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce) ``value`` against the annotation ``tp`` (``Bounds``
    included)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = _check_type(value, base, where)
        for extra in extras:
            checked = Bounds | NonEmpty | Distinct | ImageSize
            if isinstance(extra, checked) and value is not None and not extra.admits(value):
                raise ConfigError(f"{where}: expected {extra}, got {short_repr(value)}")
            if isinstance(extra, AbsolutePath) and value is not None:
                if not value.strip():  # abspath("") is the working directory: no path given
                    raise ConfigError(f"{where}: expected a path, got {value!r}")
                value = os.path.abspath(os.path.expanduser(value))
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {short_repr(value)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        return _from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range: refused below, as inf is
                number = math.inf
        elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads exponents without a dot, such as 3e-5, as strings.
            number = float(value)
        else:
            raise ConfigError(f"{where}: expected float, got {short_repr(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {short_repr(value)}")
        return number
    if origin is Literal:
        return check_choice(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {short_repr(value)}")
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {short_repr(value)}")


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {short_repr(unknown)}; expected some of "
                          f"{sorted(names)}")
    base = cls()
    kwargs = {}
    for name in names:
        if name in data:
            current = getattr(base, name)
            value = data[name]
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                merged = {**config_to_dict(current), **value}
                kwargs[name] = _from_dict(type(current), merged, f"{where}.{name}")
            else:
                kwargs[name] = _check_type(value, hints[name], f"{where}.{name}")
    return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]


def check_config(cfg: Any, where: str) -> None:
    """Raise ``ConfigError`` naming the first field of the config dataclass ``cfg`` (nested
    ones included) whose value does not fit its type and ``Bounds``. Loading checks this by
    itself; this is for configs built in code."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, f"{where}.{f.name}")
        else:
            _check_type(value, hints[f.name], f"{where}.{f.name}")


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a ``RunConfig`` from a nested mapping; ``source`` names it in errors."""
    return _from_dict(RunConfig, data, source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-Python dictionary of a config dataclass (YAML/JSON-able)."""
    return dataclasses.asdict(cfg)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: Collection[str] = ()
) -> list[str]:
    """Dotted keys whose values differ between two config dicts, those in ``ignore`` aside: what
    forbids resuming a run saved with ``saved`` under ``current``.

    A key that ``saved`` lacks but ``RunConfig`` has (an option added to nvsm after that run
    was made) is compared at its default, because a new option defaults to the behaviour
    before it existed."""
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
    defaults = _flat(json.loads(json.dumps(config_to_dict(RunConfig()))))
    a = {**{k: v for k, v in defaults.items() if k not in a}, **a}
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


def check_resumed_config(
    run_dir: Path,
    record: dict[str, Any] | None,
    current: dict[str, Any],
    resumable: Collection[str],
) -> None:
    """Refuse to resume ``run_dir``, whose ``run_info.json`` is ``record`` (None: it has none),
    with a config that differs from the recorded one outside the ``resumable`` keys. Checked
    before anything is written: the stages' own checks (a checkpoint's config) would refuse
    too, but only after run_info.json had been overwritten with the refused config, and a run
    stopped before its first checkpoint has none to refuse it.

    Raises:
        ValueError: naming the run folder and the differing keys, or the malformed field.
    """
    if record is None:
        return
    saved = record.get("config")
    info = Path(run_dir) / "run_info.json"
    if not isinstance(saved, dict):  # compared as {} it read as the defaults
        raise ValueError(
            f"cannot resume {run_dir}: {info} field 'config': expected the run's config (a JSON "
            f"object), got {type(saved).__name__ if saved is not None else 'none'}; delete "
            "run_info.json to resume on the stages' own checks"
        )
    diff = config_differences(saved, current, resumable)
    if diff:
        raise ValueError(f"cannot resume {run_dir}: its run_info.json records another config, "
                         f"which differs from this run's in {diff}")


def list_recipes(recipe_dir: Path = RECIPE_DIR) -> dict[str, str]:
    """Named recipes and their one-line descriptions."""
    out = {}
    for path in sorted(recipe_dir.glob("*.yaml")):
        data = _read_recipe(path)
        out[path.stem] = str(data.get("description", "")).strip()
    return out


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that these are errors:

    - a key given twice in one mapping (PyYAML keeps the last value silently, so a recipe could
      say two things and mean one);
    - a key that is not a string (settings have names; a list or number key failed deep
      inside);
    - an alias (``*name``): a few lines of nested aliases expand to millions of values, which
      took minutes and gigabytes to check and to quote in the error (no setting needs one);
    - a YAML 1.1 base-60 (``1:30``, read as 90) or leading-zero octal (``010``, read as 8)
      number, which nobody means in a recipe; and an integer too long for ``int`` to read
      (its ValueError escaped as a traceback).
    """

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None,
                f"alias *{event.anchor}: a recipe takes no aliases; write the value out",
                event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short_repr(key)} is not a setting's name (a string)",
                    key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short_repr(key)} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)

    def _refuse_yaml11_number(self, node: yaml.ScalarNode, value: Any) -> None:
        """ConstructorError where ``node``, read as ``value``, is a base-60 or octal number."""
        text = str(node.value)
        digits = text.lstrip("+-").replace("_", "")
        if ":" in digits:
            kind = "a base-60"
        elif isinstance(value, int) and re.fullmatch(r"0[0-9]+", digits):  # 00.5 is a float
            kind = "an octal"
        else:
            return
        raise yaml.constructor.ConstructorError(
            None, None, f"{short_repr(text)} is {kind} number in YAML 1.1 (it reads as "
            f"{value}): write the decimal number you mean, or quote it for a string",
            node.start_mark
        )

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            value = int(super().construct_yaml_int(node))
        except ValueError as exc:  # more digits than sys.get_int_max_str_digits()
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(str(node.value))} characters is too long "
                "to read", node.start_mark
            ) from exc
        self._refuse_yaml11_number(node, value)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = float(super().construct_yaml_float(node))
        self._refuse_yaml11_number(node, value)
        return value


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _RecipeLoader.construct_yaml_float)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its message quotes the text)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None or mark is None:
        return " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _read_recipe(path: Path) -> dict[str, Any]:
    """A recipe file's top-level mapping (ConfigError naming the file otherwise)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); expected a YAML recipe"
        ) from exc
    try:
        loaded = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from exc
    except RecursionError as exc:  # nested too deep for PyYAML's recursive composer
        raise ConfigError(f"{path}: not valid YAML (nested too deep: {exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def recipe_path(name: str | os.PathLike[str], recipe_dir: Path = RECIPE_DIR) -> Path:
    """Resolve a recipe: a path to a ``.yaml``/``.yml`` file, else a recipe name in
    ``recipe_dir`` (``car`` or ``car.yaml`` is ``<recipe_dir>/car.yaml``).

    Raises:
        ConfigError: neither exists; the message says what was looked for and lists the
            known recipes.
    """
    text = str(name)
    path = Path(name)
    is_yaml = path.suffix in (".yaml", ".yml")
    if is_yaml and path.is_file():
        return path
    plain = path.name == text  # no folder part: may name a recipe in recipe_dir
    recipe = path.stem if is_yaml else text
    candidate = recipe_dir / f"{recipe}.yaml"
    if plain and candidate.is_file():
        return candidate
    looked = []
    if is_yaml or not plain or path.exists():
        if path.is_dir():
            looked.append(f"{path} is a folder")
        elif path.exists():
            looked.append(f"{path} is not a .yaml or .yml file")
        else:
            looked.append(f"no file {path}")
    if plain:
        looked.append(f"no recipe {recipe!r} in {recipe_dir}")
    known = ", ".join(list_recipes(recipe_dir)) or "none"
    raise ConfigError(f"unknown recipe {text!r}: {' and '.join(looked)}; known recipes: {known} "
                      "('nvsm recipes list' describes them)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=200"`` → (["train", "steps"], 200); the value is parsed as YAML."""
    quoted = short_repr(text)
    if "=" not in text:
        raise ConfigError(f"override {quoted}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {quoted}: empty key")
    try:
        value = yaml.load(raw, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {quoted}: the value is not valid YAML "
                          f"({_yaml_problem(exc)})") from exc
    except RecursionError as exc:  # nested too deep for PyYAML's recursive composer
        raise ConfigError(f"override {quoted}: the value is not valid YAML (nested too deep: "
                          f"{exc})") from exc
    return key.strip().split("."), value


def load_config(
    recipe: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    recipe_dir: Path = RECIPE_DIR,
) -> RunConfig:
    """Defaults ← recipe YAML ← ``key=value`` overrides, validated against the dataclasses.

    An error in the recipe names its file; one that only the overrides bring names
    ``overrides`` (``overrides.train.steps: expected a value >= 1, got 0``)."""
    if recipe is None:
        return config_from_dict(apply_overrides({}, overrides), "overrides")
    path = recipe_path(recipe, recipe_dir)
    data = _read_recipe(path)
    data.setdefault("name", path.stem)
    config = config_from_dict(data, str(path))
    return override_config(config, overrides, "overrides") if overrides else config


def _merged(old: Any, new: Any) -> Any:
    """``new`` laid over ``old``: mappings key by key, nested ones too; anything else
    replaced."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``KEY.PATH=VALUE`` override in the nested mapping ``data`` (in place). A
    mapping value sets its keys only (``train={batch_size: 2}`` is ``train.batch_size=2``): it
    replaced the whole section, resetting the recipe's other values to their defaults."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {short_repr(text)}: {k} is not a section")
        node[keys[-1]] = _merged(node.get(keys[-1]), value)
    return data


def override_config(
    config: RunConfig, overrides: Sequence[str], source: str = "config"
) -> RunConfig:
    """A copy of ``config`` with ``KEY.PATH=VALUE`` overrides applied and validated."""
    return config_from_dict(apply_overrides(config_to_dict(config), overrides), source)
