"""Config resolution: presets, YAML, --set overrides, and errors that name the key."""

import pytest

from synthval.config import EvalConfig, TrainConfig, load_config, parse_override, to_dict
from synthval.errors import ConfigError


def test_defaults_preset_file_and_overrides_apply_in_order():
    text = "optimizer:\n  lr: 0.5\nepochs: 3\n"
    config = load_config(TrainConfig, preset="cpu-demo", config_text=text,
                         overrides=["optimizer.lr=0.25", "data.max_images=76"])
    assert config.model.name == "tiny"  # from the preset
    assert config.epochs == 3  # from the file, over the preset
    assert config.optimizer.lr == 0.25  # --set wins over the file
    assert config.data.max_images == 76
    assert config.schedule.name == "cosine"
    assert TrainConfig().model.name == "resnet50_fpn"  # defaults untouched


def test_to_dict_round_trips():
    config = load_config(TrainConfig, preset="cpu-demo")
    again = load_config(TrainConfig, config_text=__import__("yaml").safe_dump(to_dict(config)))
    assert again == config


@pytest.mark.parametrize(
    "override, named",
    [
        ("optimizer.learning_rate=0.1", "optimizer.learning_rate"),
        ("epochs=many", "epochs"),
        ("model.name=resnet18", "model.name"),
        ("data.hflip_prob=yes", "data.hflip_prob"),
        ("schedule.milestones=[1, two]", "schedule.milestones[1]"),
        ("data.batch_size=0", "data.batch_size"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(TrainConfig, overrides=[override])


def test_unknown_top_level_key_in_file_lists_accepted_keys():
    with pytest.raises(ConfigError) as err:
        load_config(EvalConfig, config_text="spilt: test\n", source="eval.yaml")
    assert "spilt" in str(err.value) and "split" in str(err.value)


def test_malformed_yaml_names_the_source():
    with pytest.raises(ConfigError, match="my.yaml"):
        load_config(TrainConfig, config_text="epochs: [1,\n", source="my.yaml")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="nope"):
        load_config(TrainConfig, preset="nope")


def test_override_syntax():
    assert parse_override("a.b=1") == {"a": {"b": 1}}
    assert parse_override("model.weights_backbone=null") == {"model": {"weights_backbone": None}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("epochs")


def test_exponent_floats_without_a_dot_are_numbers():
    # PyYAML (YAML 1.1) reads 1e-5 as a string; users write learning rates that way.
    config = load_config(TrainConfig, config_text="optimizer:\n  lr: 1e-5\n", overrides=["optimizer.weight_decay=5E-4"])
    assert config.optimizer.lr == 1e-5 and config.optimizer.weight_decay == 5e-4
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_config(TrainConfig, overrides=["optimizer.lr=1e-5x"])


def test_finetune_lowers_the_step_of_the_preset_and_overrides_still_win():
    train = load_config(TrainConfig, preset="cpu-demo")
    finetune = load_config(TrainConfig, preset="cpu-demo", finetune=True)
    assert finetune.optimizer.lr < train.optimizer.lr
    assert finetune.schedule.warmup_steps < train.schedule.warmup_steps
    assert finetune.model == train.model
    assert load_config(TrainConfig, finetune=True).optimizer.lr < TrainConfig().optimizer.lr
    assert load_config(TrainConfig, preset="cpu-demo", finetune=True,
                       overrides=["optimizer.lr=0.01"]).optimizer.lr == 0.01
