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


@pytest.mark.parametrize(
    "override, named",
    [
        ("optimizer.lr=.nan", "optimizer.lr: nan is not a finite number"),
        ("optimizer.lr=1e400", "optimizer.lr: inf is not a finite number"),
        ("model.frozen_bn_eps=-.inf", "model.frozen_bn_eps: -inf is not a finite number"),
        ("data.hflip_prob=1.5", "data.hflip_prob: 1.5 must be between 0 and 1"),
        ("model.box_score_thresh=-0.1", "model.box_score_thresh: -0.1 must be between 0 and 1"),
        ("schedule.warmup_factor=2", "schedule.warmup_factor: 2.0 must be between 0 and 1"),
        ("data.effective_batch_size=0", "data.effective_batch_size: 0 must be greater than 0"),
    ],
)
def test_non_finite_numbers_and_probabilities_outside_0_1_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(TrainConfig, preset="seed-synthetic", overrides=[override])
    with pytest.raises(ConfigError, match=named.split(":")[0]):  # in a file too
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: {value}\n"
        load_config(TrainConfig, config_text=text, source="recipe.yaml")


def test_eval_probability_is_checked_too():
    with pytest.raises(ConfigError, match="draw_score_thresh: 7.0 must be between 0 and 1"):
        load_config(EvalConfig, overrides=["draw_score_thresh=7"])


def test_effective_batch_derives_accumulation_from_the_process_count():
    from synthval.config import accumulation_steps

    seed = load_config(TrainConfig, preset="seed-synthetic")
    # The seed's 256 images per step: 8 GPUs x 4 x 8 accumulation, and the same optimisation on fewer GPUs.
    assert [accumulation_steps(seed, world) for world in (8, 4, 2, 1)] == [8, 16, 32, 64]
    assert [accumulation_steps(load_config(TrainConfig, preset="seed-real"), w) for w in (1, 8)] == [8, 1]
    with pytest.raises(ConfigError, match=r"effective_batch_size=256 is not a whole multiple of "
                                          r"data.batch_size=4 x 3 process\(es\) = 12"):
        accumulation_steps(seed, 3)
    with pytest.raises(ConfigError, match=r"grad_accum_steps=3 contradicts .* which needs 64"):
        accumulation_steps(load_config(TrainConfig, preset="seed-synthetic", overrides=["grad_accum_steps=3"]), 1)
    plain = load_config(TrainConfig, preset="cpu-demo", overrides=["grad_accum_steps=3"])
    assert plain.data.effective_batch_size is None and accumulation_steps(plain, 4) == 3


def test_seed_presets_hold_the_seed_recipe():
    # Every value here is in the README's recipe table with its source in datasetinsights 0.2.x.
    synthetic = load_config(TrainConfig, preset="seed-synthetic")
    assert (synthetic.model.name, synthetic.model.weights_backbone, synthetic.model.backbone_norm,
            synthetic.model.frozen_bn_eps, synthetic.model.trainable_backbone_layers) == (
        "resnet50_fpn", "imagenet", "frozen", 0.0, 3)
    assert (synthetic.model.min_size, synthetic.model.max_size, synthetic.model.box_score_thresh,
            synthetic.model.box_detections_per_img) == (800, 1333, 0.05, 100)
    assert (synthetic.optimizer.name, synthetic.optimizer.lr, synthetic.optimizer.weight_decay) == ("adam", 2e-4, 0.0)
    assert (synthetic.schedule.name, synthetic.schedule.warmup_steps) == ("constant", 0)
    assert (synthetic.data.batch_size, synthetic.data.effective_batch_size, synthetic.epochs) == (4, 256, 10)
    assert (synthetic.data.split, synthetic.data.val_split) == ("seed-train", "seed-val")
    assert (synthetic.data.hflip_prob, synthetic.data.photometric, synthetic.amp) == (0.0, False, "off")
    assert load_config(TrainConfig, preset="seed-unity-simulation") == synthetic

    real = load_config(TrainConfig, preset="seed-real")
    assert (real.optimizer.lr, real.data.batch_size, real.data.effective_batch_size, real.epochs) == (2e-4, 8, 64, 100)
    assert real.data.split is None and real.model == synthetic.model
    finetune = load_config(TrainConfig, preset="seed-finetune")
    assert (finetune.optimizer.lr, finetune.data.effective_batch_size, finetune.epochs) == (2e-5, 64, 30)
    # `synthval finetune` of any seed preset is the seed's fine-tuning recipe.
    for preset in ("seed-synthetic", "seed-real", "seed-finetune"):
        assert load_config(TrainConfig, preset=preset, finetune=True) == finetune

    modern = load_config(TrainConfig, preset="modern")
    assert (modern.optimizer.name, modern.optimizer.lr, modern.data.effective_batch_size, modern.epochs,
            modern.schedule.milestones, modern.schedule.warmup_steps) == ("sgd", 0.02, 16, 26, [16, 22], 1000)
    assert modern.model.backbone_norm is None and modern.model.frozen_bn_eps == 1e-5  # today's torchvision
