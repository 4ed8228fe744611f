import dataclasses
import re
import typing
from typing import Literal

import pytest

from nvsm.config import (
    ConfigError,
    RunConfig,
    ScheduleName,
    check_config,
    config_from_dict,
    config_to_dict,
    list_recipes,
    load_config,
)


def test_defaults_round_trip():
    cfg = RunConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # Missing keys are filled with defaults, so the default alone would round-trip through an
    # empty dict: every section is also changed, and every field must be written out.
    changed = load_config("synthetic-car-7shot", [
        "seed=5", "device=cpu", "data.crop_size=[64, 96]", "model.feature_dim=64",
        "labels.annotations=20", "train.steps=123", "infer.schedule=reference",
        "fewshot.rounds=3",
    ])  # fmt: skip
    assert changed != RunConfig()
    written = config_to_dict(changed)
    assert config_from_dict(written) == changed

    def names(obj: typing.Any, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out |= names(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {
                f"{prefix}{f.name}"}
        return out

    def keys(d: dict, prefix: str = "") -> set[str]:
        return set().union(*(keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
                             for k, v in d.items()))

    assert keys(written) == names(changed)


def test_recipe_and_overrides(tmp_path):
    (tmp_path / "r1.yaml").write_text(
        "description: a test recipe\nseed: 3\nmodel:\n  feature_dim: 64\n"
    )
    cfg = load_config(
        "r1", ["model.backbone=resnet50-unet", "data.crop_size=[64, 96]"], recipe_dir=tmp_path
    )
    assert cfg.name == "r1" and cfg.seed == 3
    assert cfg.model.feature_dim == 64 and cfg.model.backbone == "resnet50-unet"
    assert cfg.data.crop_size == [64, 96] and cfg.data.dataset == "synthetic"
    assert list_recipes(tmp_path) == {"r1": "a test recipe"}


def test_exponent_floats_without_a_dot(tmp_path):
    # PyYAML (YAML 1.1) reads 3e-5 as the string "3e-5"; a float field takes it as the number.
    (tmp_path / "r.yaml").write_text("train:\n  lr_head: 2E+3\n")
    cfg = load_config("r", ["train.lr_backbone=3e-5"], recipe_dir=tmp_path)
    assert cfg.train.lr_backbone == 3e-5 and cfg.train.lr_head == 2000.0
    with pytest.raises(ConfigError, match=r"train\.lr_backbone: expected float, got 'fast'"):
        load_config(None, ["train.lr_backbone=fast"])
    with pytest.raises(ConfigError, match=r"seed: expected int, got '1e3'"):
        load_config(None, ["seed=1e3"])


def test_bad_recipes_name_file_and_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  feature_dimm: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml\.model: unknown key\(s\) \['feature_dimm'\]"):
        load_config("bad", recipe_dir=tmp_path)
    (tmp_path / "typ.yaml").write_text("seed: many\n")
    with pytest.raises(ConfigError, match=r"typ\.yaml\.seed: expected int"):
        load_config("typ", recipe_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config("nope", recipe_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(None, ["seed"])


def test_unknown_recipe_says_where_it_looked(tmp_path, monkeypatch):
    # '-r nosuch.yaml' looked only for recipes/nosuch.yaml.yaml and did not say a path was tried.
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "r1.yaml").write_text("seed: 3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("nosuch.yaml", recipe_dir=recipes)
    assert str(err.value) == (
        f"unknown recipe 'nosuch.yaml': no file nosuch.yaml and no recipe 'nosuch' in {recipes}; "
        "known recipes: r1 ('nvsm recipes list' describes them)"
    )
    with pytest.raises(ConfigError) as err:
        load_config("nosuch", recipe_dir=recipes)
    assert str(err.value).startswith(f"unknown recipe 'nosuch': no recipe 'nosuch' in {recipes};")
    with pytest.raises(ConfigError, match=r"'sub/r1\.yaml': no file sub/r1\.yaml; known recipes"):
        load_config("sub/r1.yaml", recipe_dir=recipes)
    (tmp_path / "notes.txt").write_text("seed: 3\n")
    with pytest.raises(ConfigError, match=r"notes\.txt is not a \.yaml or \.yml file"):
        load_config("notes.txt", recipe_dir=recipes)
    # A recipe name given with its extension is found in the recipe folder.
    assert load_config("r1.yaml", recipe_dir=recipes).seed == 3


def test_numbers_out_of_range_name_file_and_key(tmp_path):
    (tmp_path / "neg.yaml").write_text("train:\n  steps: -1\n")
    with pytest.raises(ConfigError, match=r"neg\.yaml\.train\.steps: expected a value >= 1"):
        load_config("neg", recipe_dir=tmp_path)
    for override, message in (
        ("train.temperature=0", r"train\.temperature: expected a value > 0, got 0"),
        ("train.bank_momentum=1.5", r"train\.bank_momentum: expected a value >= 0 and <= 1"),
        ("train.lr_head=.inf", r"train\.lr_head: expected a finite number, got inf"),
        ("fewshot.occlusion_levels=[0, 4]", r"fewshot\.occlusion_levels\[1\]: expected a value"),
        ("data.crop_size=[0, 64]", r"data\.crop_size\[0\]: expected a value >= 1, got 0"),
        ("labels.annotations=0", r"labels\.annotations: expected a value >= 1, got 0"),
        ("seed=-1", r"seed: expected a value >= 0 and <= 4294967295, got -1"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    # The edges are allowed, and None still means "not set".
    cfg = load_config(None, ["train.bank_momentum=1", "fewshot.hubness_k=0", "seed=0"])
    assert cfg.train.bank_momentum == 1.0 and cfg.labels.annotations is None


def test_list_settings_have_the_length_they_need():
    # Checked on loading, naming the key, rather than in the middle of cropping (where [64]
    # raised an IndexError from deep inside and [60, 100] stopped only after the run began).
    for value in ("[64]", "[64, 96, 3]", "[60, 100]", "[]"):
        with pytest.raises(
            ConfigError, match=r"data\.crop_size: expected \(H, W\): two multiples of 8, got"
        ):
            load_config(None, [f"data.crop_size={value}"])
    cfg = load_config(None, ["data.crop_size=[64, 96]"])
    with pytest.raises(ConfigError, match=r"data\.categories: expected at least one item"):
        load_config(None, ["data.categories=[]"])  # it read every category's lists
    assert cfg.data.crop_hw() == (64, 96) and load_config(None).data.crop_hw() is None


def test_defaults_and_recipes_are_within_bounds():
    check_config(RunConfig(), "defaults")
    for name in list_recipes():
        check_config(load_config(name), name)


def test_every_shipped_recipe_loads():
    names = list_recipes()
    for name in (
        "synthetic-car-7shot",
        "synthetic-car-20shot",
        "synthetic-car-50shot",
        "pascal3d-car-7shot",
        "pascal3d-car-20shot",
        "pascal3d-car-50shot",
        "kitti-car-7shot",
    ):
        assert name in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
    assert load_config("kitti-car-7shot").fewshot.occlusion_levels == [0, 1, 2]
    assert load_config("synthetic-car-20shot").labels.annotations == 20


def test_unreadable_recipe_is_named_in_the_listing(tmp_path):
    (tmp_path / "broken.yaml").write_text("description: a: b\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        list_recipes(tmp_path)


def test_a_config_built_in_code_is_checked_before_training(tmp_path):
    import dataclasses

    from nvsm.pipeline import train_and_evaluate

    base = RunConfig()
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=0))
    with pytest.raises(ConfigError, match=r"config\.train\.steps: expected a value >= 1, got 0"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _choice_settings(cls: type = RunConfig, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Key → choices of every ``Literal``-typed setting, nested sections included."""
    out: dict[str, tuple[str, ...]] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(_choice_settings(tp, f"{prefix}{f.name}."))
        elif typing.get_origin(tp) is Literal:
            out[f"{prefix}{f.name}"] = typing.get_args(tp)
    return out


def test_string_settings_take_only_their_choices(tmp_path):
    # These were plain strings: a typo failed deep inside a run (after cropping or training,
    # leaving a run folder), or was never noticed (fewshot.faiss_index with the torch matcher).
    settings = _choice_settings()
    assert set(settings) == {
        "data.dataset", "data.crop_protocol", "data.synth_size", "model.rasterizer",
        "train.near_mode", "train.sample_mode", "labels.anchors", "infer.schedule",
        "fewshot.mstep_init", "fewshot.matcher", "fewshot.faiss_index", "fewshot.score_area",
    }
    for key, choices in settings.items():
        section, name = key.split(".")
        for choice in choices:
            assert getattr(getattr(load_config(None, [f"{key}={choice}"]), section), name) == choice
        message = f"overrides.{key}: expected one of {' | '.join(choices)}, got 'bogus'"
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [f"{key}=bogus"])
        with pytest.raises(ConfigError, match=re.escape(f"{key}: expected one of")):
            load_config(None, [f"{key}=3"])  # not a string at all
    (tmp_path / "r.yaml").write_text("data:\n  crop_protocol: box\n")
    message = "r.yaml.data.crop_protocol: expected one of gt-normalized | bbox, got 'box'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("r", recipe_dir=tmp_path)


def test_choices_match_what_their_modules_implement():
    from nvsm.config import DataConfig
    from nvsm.data.synth import SIZE_PRESETS
    from nvsm.infer.solve import SCHEDULES

    synth_sizes = typing.get_args(typing.get_type_hints(DataConfig)["synth_size"])
    assert set(synth_sizes) == set(SIZE_PRESETS)
    assert set(typing.get_args(ScheduleName)) == set(SCHEDULES)


def test_arguments_below_the_config_are_checked_like_settings(tmp_path):
    # Splits, crop cameras and the PASCAL3D+ reader each had their own "must be one of" check
    # and message; they share the config's now (and a tuple of choices works as a Literal).
    from nvsm.data.crops import crop_camera
    from nvsm.data.pascal3d import load_pascal3d
    from nvsm.data.record import ObjectRecord
    from nvsm.data.splits import select_labelled
    from nvsm.errors import check_choice

    assert check_choice("b", ("a", "b"), "x") == "b"
    with pytest.raises(ConfigError, match=re.escape("x: expected one of a | b, got 'c'")):
        check_choice("c", ("a", "b"), "x")
    with pytest.raises(ConfigError, match=re.escape("x: expected one of a | b, got ('a',)")):
        check_choice(("a",), ("a", "b"), "x")
    message = "strategy: expected one of random | stratified, got 'even'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        select_labelled([], 0, "even")
    message = "subset: expected one of imagenet | pascal, got 'coco'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_pascal3d(tmp_path, ["car"], subset="coco")
    record = ObjectRecord.__new__(ObjectRecord)
    message = "protocol: expected one of gt-normalized | bbox, got 'box'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        crop_camera(record, "box")


def test_non_utf8_recipe_names_its_file(tmp_path):
    # Before: path.read_text() raised a bare UnicodeDecodeError (not a ConfigError) that named
    # no file, from load_config and list_recipes alike.
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"seed: 3\ndescription: \xff\xfe\n")
    message = f"{path}: not UTF-8 text (invalid byte 0xff at offset 21)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("bad", recipe_dir=tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        list_recipes(tmp_path)


def test_a_key_given_twice_or_a_value_that_is_not_yaml_is_named(tmp_path):
    # PyYAML keeps the last of two equal keys silently: the recipe said steps 3 and ran 5.
    (tmp_path / "twice.yaml").write_text("train:\n  steps: 3\ntrain:\n  steps: 5\n")
    message = "twice.yaml: not valid YAML (key 'train' is given twice at line 3, column 1)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("twice", recipe_dir=tmp_path)
    (tmp_path / "inner.yaml").write_text("train:\n  steps: 3\n  steps: 5\n")
    with pytest.raises(ConfigError, match=re.escape("key 'steps' is given twice at line 3")):
        load_config("inner", recipe_dir=tmp_path)
    # An override whose value does not parse raised PyYAML's own error.
    message = "override 'train.steps=[': the value is not valid YAML (expected the node content"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["train.steps=["])
    assert load_config(None, ["data.crop_size=[64, 96]"]).data.crop_size == [64, 96]


def test_path_settings_are_stored_absolute(tmp_path, monkeypatch):
    # A relative --root was recorded as given: the run's config broke from any other folder
    # (nvsm evaluate -m RUN/round_1/model.pt from elsewhere could not find the data).
    import os

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=data/P3D", "data.cad_root=../cad",
                             "model.backbone_weights=~/w.pth"])
    assert cfg.data.root == str(tmp_path / "data" / "P3D")
    assert cfg.data.cad_root == str(tmp_path.parent / "cad")
    assert cfg.model.backbone_weights == os.path.expanduser("~/w.pth")
    assert cfg.data.occluded_root is None  # not set stays not set
    assert config_from_dict(config_to_dict(cfg)) == cfg  # already absolute: unchanged


def test_a_huge_integer_for_a_float_setting_is_not_a_finite_number(tmp_path):
    # float() of an int beyond its range raised OverflowError: a traceback, naming no key.
    huge = "1" * 400
    with pytest.raises(ConfigError, match=r"^overrides\.train\.lr_head: expected a finite number"):
        load_config(None, [f"train.lr_head={huge}"])
    (tmp_path / "r.yaml").write_text(f"data:\n  crop_scale: {huge}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml\.data\.crop_scale: expected a finite number"):
        load_config("r", recipe_dir=tmp_path)
    # Longer than Python reads into an int at all (its ValueError escaped from PyYAML).
    with pytest.raises(ConfigError, match="an integer of 5000 characters is too long to read"):
        load_config(None, [f"seed={'1' * 5000}"])


def test_yaml_nested_too_deep_names_the_file_or_the_override(tmp_path):
    # PyYAML composes recursively: 3000 levels raised RecursionError, a traceback.
    deep = "[" * 3000 + "]" * 3000
    (tmp_path / "deep.yaml").write_text(f"seed: {deep}\n")
    path = tmp_path / "deep.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid YAML (nested too deep: ")):
        load_config("deep", recipe_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"seed={deep}"])
    assert "the value is not valid YAML (nested too deep: " in str(err.value)
    assert str(err.value).startswith("override 'seed=[[[") and len(str(err.value)) < 500


def test_a_mapping_override_sets_only_its_keys(tmp_path):
    # -s 'train={batch_size: 2}' replaced the recipe's whole train section: its steps (and
    # everything else it set) silently went back to the defaults.
    (tmp_path / "r.yaml").write_text(
        "train:\n  steps: 3\n  augment:\n    color_jitter: 0.5\ndata:\n  crop_size: [64, 96]\n"
    )
    cfg = load_config("r", ["train={batch_size: 2, augment: {flip: false}}",
                            "data={crop_size: [64, 120]}"], recipe_dir=tmp_path)
    assert (cfg.train.steps, cfg.train.batch_size) == (3, 2)
    assert cfg.train.augment.color_jitter == 0.5 and cfg.train.augment.flip is False
    assert cfg.data.crop_size == [64, 120]  # a list is one value: replaced whole
    assert cfg == load_config("r", ["train.batch_size=2", "train.augment.flip=false",
                                    "data.crop_size=[64, 120]"], recipe_dir=tmp_path)
    # Without a recipe the section's other keys keep their defaults, as before.
    assert load_config(None, ["train={batch_size: 2}"]).train.steps == RunConfig().train.steps


def test_errors_quote_values_briefly_and_aliases_are_refused(tmp_path):
    # Five lines of nested aliases expanded to 10**6 values, all quoted in a 358 KB message
    # (seven lines ran out of time and memory); a recipe takes no aliases now.
    lines = ["seed:", "  - &a0 [1,1,1,1,1,1,1,1,1,1]"]
    lines += [f"  - &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config("laughs", recipe_dir=tmp_path)
    assert str(err.value) == (f"{tmp_path / 'laughs.yaml'}: not valid YAML (alias *a0: a recipe "
                              "takes no aliases; write the value out at line 3, column 10)")
    with pytest.raises(ConfigError, match=r"alias \*b: a recipe takes no aliases"):
        load_config(None, ["train=[&b 1, *b]"])
    # A long or deeply nested value written out is quoted shortly.
    for value in ("[" + ", ".join(["1"] * 5000) + "]", "[" * 100 + "]" * 100, "x" * 5000):
        with pytest.raises(ConfigError, match=r"^overrides\.seed: expected int, got ") as err:
            load_config(None, [f"seed={value}"])
        assert len(str(err.value)) < 400, len(str(err.value))
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.categories=[{', '.join(['car'] * 5000)}]"])
    assert str(err.value).startswith("overrides.data.categories: expected each item once, got "
                                     "['car', 'car', ") and len(str(err.value)) < 400


def test_duplicates_empty_paths_and_yaml_1_1_numbers_are_refused(tmp_path):
    # Each was accepted silently: [car, car] read every record twice, '' stood for the working
    # directory, 1:30 read as 90 (base 60) and 010 as 8 (octal).
    for setting, message in (
        ("data.categories=[car, bottle, car]", "data.categories: expected each item once, got "
         "['car', 'bottle', 'car']"),
        ("fewshot.occlusion_levels=[0, 0]", "fewshot.occlusion_levels: expected each item "
         "once, got [0, 0]"),
        ("data.root=''", "data.root: expected a path, got ''"),
        ("data.cad_root=' '", "data.cad_root: expected a path, got ' '"),
        ("model.backbone_weights=''", "model.backbone_weights: expected a path, got ''"),
        ("train.steps=1:30", "'1:30' is a base-60 number in YAML 1.1 (it reads as 90): write "
         "the decimal number you mean, or quote it for a string at line 1, column 1"),
        ("train.lr_head=1:30.5", "'1:30.5' is a base-60 number in YAML 1.1 (it reads as 90.5)"),
        ("seed=010", "'010' is an octal number in YAML 1.1 (it reads as 8)"),
        ("seed=-0_10", "'-0_10' is an octal number in YAML 1.1 (it reads as -8)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [setting])
    (tmp_path / "r.yaml").write_text("seed: 010\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{tmp_path / 'r.yaml'}: not valid YAML ('010' is an octal number in YAML 1.1")):
        load_config("r", recipe_dir=tmp_path)
    (tmp_path / "c.yaml").write_text("data:\n  categories: [car, car]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml\.data\.categories: expected each item once"):
        load_config("c", recipe_dir=tmp_path)
    # What these numbers mean unambiguously still reads, as do 0, a float and a quoted string.
    cfg = load_config(None, ["seed=0x1F", "train.steps=1_000", "train.lr_head=00.5",
                             "fewshot.occlusion_levels=[0, 1]", "description='1:30'"])
    assert (cfg.seed, cfg.train.steps, cfg.train.lr_head) == (31, 1000, 0.5)
    assert cfg.description == "1:30" and load_config(None, ["seed=0"]).seed == 0
