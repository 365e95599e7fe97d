from pathlib import Path

import pytest
import yaml

from eagan.config import Config, config_differences, load_config, to_dict
from eagan.errors import UserError
from eagan.nets.factory import build_discriminator, build_generator

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr_g: 1.0e-4\n  n_dis: 2\n")
    config = load_config(path, ["train.n_dis=3", "model.attention=self"])
    assert config.train.lr_g == 1e-4  # from the file
    assert config.train.n_dis == 3  # override wins over the file
    assert config.model.attention == "self"
    assert config.train.lr_d == Config().train.lr_d  # default untouched
    assert config.run_dir == str(Path("runs") / "config")


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-4 as a string: we accept it for float keys.
    config = load_config(write(tmp_path, "train:\n  lr_d: 1e-4\n"), ["train.lr_g=3e-4"])
    assert (config.train.lr_d, config.train.lr_g) == (1e-4, 3e-4)


@pytest.mark.parametrize("text, overrides, fragments", [
    ("train:\n  lr_gg: 1.0\n", [], ["train.lr_gg", "did you mean train.lr_g"]),
    ("trian:\n  lr_g: 1.0\n", [], ["unknown key trian", "did you mean train"]),
    ("train:\n  n_dis: two\n", [], ["train.n_dis", "expected int", "'two'"]),
    ("train:\n  n_dis: 1.5\n", [], ["train.n_dis", "expected int"]),
    ("train:\n  hflip: yes\n", [], ["unknown key train.hflip", "data"]),
    ("data:\n  hflip: 1\n", [], ["data.hflip", "expected bool"]),
    ("train:\n  lr_g: -1.0e-4\n", [], ["train.lr_g", "> 0"]),
    ("train:\n  batch_size: 0\n", [], ["train.batch_size", "> 0"]),
    ("train:\n  n_dis: 0\n", [], ["train.n_dis", "> 0"]),
    ("train:\n  beta1: 1.5\n", [], ["train.beta1", "<= 1.0"]),
    ("data:\n  image_size: 48\n", [], ["data.image_size", "32, 64, 128", "48"]),
    ("model:\n  attention: externel\n", [], ["model.attention", "did you mean external"]),
    ("model:\n  g_attention_after: 4\n", [], ["model.g_attention_after", "3 blocks"]),
    ("model:\n  attention: self\n  heads: 2\n", [], ["model.heads", "single head"]),
    ("train: 5\n", [], ["train", "expected a mapping"]),
    ("- a\n- b\n", [], ["top level", "mapping"]),
    ("train:\n  lr_g: [1\n", [], ["malformed YAML", "line"]),
    ("", ["train.lr_g=abc"], ["--set train.lr_g=abc", "expected float"]),
    ("", ["train.nope=1"], ["--set train.nope=1", "unknown key train.nope"]),
    ("", ["lr_g"], ["--set lr_g", "section.key=value"]),
])
def test_bad_configs_name_file_key_and_expectation(tmp_path, text, overrides, fragments):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    if not overrides:
        assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_differences_are_listed_by_dotted_key():
    old, new = to_dict(Config()), to_dict(Config())
    new["model"]["attention"] = "self"
    new["train"]["lr_g"] = 1.0
    assert config_differences(old, new) == ["model.attention: 'external' -> 'self'",
                                            "train.lr_g: 0.0002 -> 1.0"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds(path):
    config = load_config(path)
    classes = {"cifar10": 10, "tiny_imagenet": 200, "digits": 10}.get(config.data.dataset, 0)
    generator = build_generator(config.model, config.data.image_size, classes)
    discriminator = build_discriminator(config.model, config.data.image_size, classes)
    assert generator.image_size == discriminator.image_size == config.data.image_size


@pytest.mark.parametrize("dataset", ["cifar10", "tiny_imagenet"])
def test_sagan_and_eagan_configs_differ_only_in_attention(dataset):
    configs_dir = CONFIGS[0].parent
    sagan = to_dict(load_config(configs_dir / f"{dataset}_sagan.yaml"))
    eagan = to_dict(load_config(configs_dir / f"{dataset}_eagan.yaml"))
    sagan["run_dir"] = eagan["run_dir"]
    assert config_differences(sagan, eagan) == ["model.attention: 'self' -> 'external'"]


def test_paper_recipes():
    configs_dir = CONFIGS[0].parent
    cifar = load_config(configs_dir / "cifar10_eagan.yaml").train
    tiny = load_config(configs_dir / "tiny_imagenet_eagan.yaml").train
    assert (cifar.batch_size, cifar.lr_g, cifar.lr_d, cifar.beta1, cifar.n_dis) == \
        (64, 2e-4, 2e-4, 0.5, 5)
    assert (tiny.batch_size, tiny.lr_g, tiny.lr_d, tiny.beta1, tiny.n_dis) == \
        (256, 1e-4, 4e-4, 0.0, 1)
    for recipe in (cifar, tiny):
        assert (recipe.total_steps, recipe.adam_eps, recipe.beta2, recipe.loss) == \
            (100_000, 1e-6, 0.999, "hinge")
        assert recipe.ema_decay == 0.0 and recipe.precision == "fp32" and not recipe.compile


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(write(tmp_path, "model:\n  attention: efficient\n"))
    dumped = write(tmp_path, yaml.safe_dump(to_dict(config)))
    assert to_dict(load_config(dumped)) == to_dict(config)


def test_the_digits_protocol_needs_conditional_digits(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  protocol: digits\n")
    with pytest.raises(UserError, match=r"eval.protocol: 'digits' scores class-conditional "
                                        r"generators of data.dataset digits, got dataset "
                                        r"'cifar10'$"):
        load_config(path)
    path.write_text("data:\n  dataset: digits\nmodel:\n  conditional: false\n"
                    "eval:\n  protocol: digits\n")
    with pytest.raises(UserError, match="got dataset 'digits', unconditional"):
        load_config(path)


@pytest.mark.parametrize("value, message", [
    ("0", "train.collective_timeout_s: expected a value > 0, got 0.0"),
    ("-5", "train.collective_timeout_s: expected a value > 0, got -5.0"),
    ("soon", "train.collective_timeout_s: expected float, got 'soon'"),
])
def test_collective_timeout_is_a_positive_number_of_seconds(tmp_path, value, message):
    path = write(tmp_path, "")
    assert load_config(path).train.collective_timeout_s == 300.0
    assert load_config(path, ["train.collective_timeout_s=20"]).train.collective_timeout_s == 20.0
    with pytest.raises(UserError) as caught:
        load_config(path, [f"train.collective_timeout_s={value}"])
    assert str(caught.value) == f"--set train.collective_timeout_s={value}: {message}"
