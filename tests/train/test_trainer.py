import contextlib
import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eagan.config import load_config
from eagan.errors import UserError
from eagan.nets.losses import LOSSES, d_hinge_loss, g_hinge_loss
from eagan.nets.models import Discriminator, Generator
from eagan.train import checkpoint as ckpt
from eagan.train.loop import NonFiniteLoss, train
from eagan.train.steps import (GANModules, StepOptions, discriminator_step, generator_step,
                               resolve_precision)
from tests.helpers import assert_same_training_state, evaluation_result


def tiny_gan(attention: str = "external", seed: int = 0, aux_classifier: bool = False
             ) -> GANModules:
    torch.manual_seed(seed)
    generator = Generator(32, 10, z_dim=16, base_channels=4, attention=attention, memory_size=8)
    discriminator = Discriminator(32, 10, base_channels=4, attention=attention, memory_size=8,
                                  aux_classifier=aux_classifier)
    for block in (generator.attention, discriminator.attention):
        block.gamma.data.fill_(0.5)  # so the attention weights take part in every update
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=1e-6)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=1e-6)
    scalers = [torch.amp.GradScaler("cpu", enabled=False) for _ in range(2)]
    return GANModules(generator, discriminator, opt_g, opt_d, *scalers, generator,
                      discriminator, generator, discriminator)


def batch(seed: int = 1, size: int = 4):
    rng = torch.Generator().manual_seed(seed)
    real = torch.rand(size, 3, 32, 32, generator=rng) * 2 - 1
    labels = torch.randint(10, (size,), generator=rng)
    z = torch.randn(size, 16, generator=rng)
    return real, labels, z, torch.randint(10, (size,), generator=rng)


def snapshot(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def changed(before, module):
    return [name for name, value in module.state_dict().items()
            if not torch.equal(before[name], value)]


OPTIONS = StepOptions(d_loss=d_hinge_loss, g_loss=g_hinge_loss)


def test_discriminator_step_leaves_generator_unchanged():
    gan = tiny_gan()
    g_before, d_before = snapshot(gan.generator), snapshot(gan.discriminator)
    discriminator_step(gan, OPTIONS, *batch(), step=0)
    # G's forward moves its buffers (batch-norm statistics, spectral-norm vectors), never a
    # parameter.
    g_parameters = {name for name, _ in gan.generator.named_parameters()}
    assert changed(g_before, gan.generator)
    assert not g_parameters & set(changed(g_before, gan.generator))
    assert all(param.grad is None for param in gan.generator.parameters())
    d_parameters = {name for name, _ in gan.discriminator.named_parameters()}
    assert d_parameters == d_parameters & set(changed(d_before, gan.discriminator))


def test_generator_step_leaves_discriminator_weights_unchanged():
    gan = tiny_gan()
    g_before, d_before = snapshot(gan.generator), snapshot(gan.discriminator)
    real, labels, z, fake_labels = batch()
    generator_step(gan, OPTIONS, z, fake_labels, step=0)
    # D's spectral-norm vectors advance in any training-mode forward; its parameters must not.
    d_parameters = {name for name, _ in gan.discriminator.named_parameters()}
    assert not d_parameters & set(changed(d_before, gan.discriminator))
    assert all(param.grad is None for param in gan.discriminator.parameters())
    assert all(param.requires_grad for param in gan.discriminator.parameters())
    g_parameters = {name for name, _ in gan.generator.named_parameters()}
    assert g_parameters == g_parameters & set(changed(g_before, gan.generator))


AUX_WEIGHT = 0.7


def test_discriminator_step_with_classifier_adds_its_cross_entropy_on_real_images():
    gan = tiny_gan(aux_classifier=True)
    real, labels, z, fake_labels = batch()
    d_copy = copy.deepcopy(gan.discriminator)
    with torch.no_grad():  # G's output as the step sees it (batch statistics, same SN state)
        fake = copy.deepcopy(gan.generator)(z, fake_labels)
        logits, class_logits = d_copy(torch.cat([real, fake]), torch.cat([labels, fake_labels]),
                                      classify=True)
    expected_class = F.cross_entropy(class_logits[:4], labels)
    expected = d_hinge_loss(*logits.split(4))[0] + AUX_WEIGHT * expected_class
    head_before = gan.discriminator.classifier.parametrizations.weight.original.clone()

    options = StepOptions(d_loss=d_hinge_loss, g_loss=g_hinge_loss, class_weight=AUX_WEIGHT)
    losses = discriminator_step(gan, options, real, labels, z, fake_labels, 0)
    torch.testing.assert_close(losses["Loss/D/classifier"], expected_class)
    torch.testing.assert_close(losses["Loss/D/total"], expected)
    assert not torch.equal(head_before,
                           gan.discriminator.classifier.parametrizations.weight.original)


def test_generator_step_with_classifier_asks_d_to_recognise_the_requested_class():
    gan = tiny_gan(aux_classifier=True)
    _, _, z, fake_labels = batch()
    with torch.no_grad():
        fake = copy.deepcopy(gan.generator)(z, fake_labels)
        logits, class_logits = copy.deepcopy(gan.discriminator)(fake, fake_labels,
                                                                 classify=True)
    expected_class = F.cross_entropy(class_logits, fake_labels)
    d_before = snapshot(gan.discriminator)

    options = StepOptions(d_loss=d_hinge_loss, g_loss=g_hinge_loss, class_weight=AUX_WEIGHT)
    losses = generator_step(gan, options, z, fake_labels, step=0)
    torch.testing.assert_close(losses["Loss/G/classifier"], expected_class)
    torch.testing.assert_close(losses["Loss/G/total"],
                               g_hinge_loss(logits) + AUX_WEIGHT * expected_class)
    d_parameters = {name for name, _ in gan.discriminator.named_parameters()}
    assert not d_parameters & set(changed(d_before, gan.discriminator))


def test_steps_name_their_losses_and_report_a_classifier_loss_only_with_a_classifier():
    gan = tiny_gan()
    real, labels, z, fake_labels = batch()
    assert set(discriminator_step(gan, OPTIONS, real, labels, z, fake_labels, 0)) == {
        "Loss/D/real", "Loss/D/fake", "Loss/D/total"}
    assert set(generator_step(gan, OPTIONS, z, fake_labels, 0)) == {"Loss/G/total"}


def test_bf16_autocast_steps_stay_finite_and_close_to_float32():
    results = {}
    for precision in ("fp32", "bf16"):
        gan = tiny_gan(seed=0)
        autocast = contextlib.nullcontext if precision == "fp32" else \
            functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
        options = StepOptions(d_loss=d_hinge_loss, g_loss=g_hinge_loss, autocast=autocast)
        real, labels, z, fake_labels = batch()
        d_losses = discriminator_step(gan, options, real, labels, z, fake_labels, step=0)
        g_losses = generator_step(gan, options, z, fake_labels, step=0)
        results[precision] = torch.stack([*d_losses.values(), *g_losses.values()])
        assert all(torch.isfinite(p).all() for p in gan.generator.parameters())
        assert gan.generator.attention.memory_key.parametrizations.weight.original.dtype == \
            torch.float32
    torch.testing.assert_close(results["bf16"], results["fp32"], rtol=0.05, atol=0.05)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_writes_checkpoints_logs_and_grids(tiny_config_path):
    config = load_config(tiny_config_path)
    result = train(config, show_progress=False)
    run_dir = result.run_dir
    assert result.step == 4
    # checkpoint_every 2, keep 2: steps 2 and 4 remain.
    assert [step for step, _ in ckpt.step_checkpoints(run_dir)] == [2, 4]
    payload = ckpt.load_checkpoint(ckpt.step_path(run_dir, 4))
    assert payload["step"] == 4 and payload["config"]["model"]["attention"] == "external"
    assert set(payload) >= {"generator", "discriminator", "optimizer_g", "optimizer_d", "rng",
                            "data_order", "latents", "fixed_z", "config"}
    lines = read_jsonl(run_dir / "stats.jsonl")
    assert [line["step"] for line in lines] == [2, 4]
    assert {"Loss/D/real", "Loss/D/fake", "Loss/G/total", "Timing/steps_per_sec",
            "Attention/gamma/G/attention", "Progress/lr_g"} <= set(lines[0])
    assert not any("classifier" in key for key in lines[0])
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run_dir.glob(".*.tmp"))


def test_training_with_auxiliary_classifier_logs_and_checkpoints_it(tmp_path,
                                                                    tiny_config_path):
    config = load_config(tiny_config_path, [f"run_dir={tmp_path / 'ac'}",
                                            "model.aux_classifier=true",
                                            "train.aux_loss_weight=0.5"])
    run_dir = train(config, show_progress=False).run_dir
    lines = read_jsonl(run_dir / "stats.jsonl")
    for line in lines:
        assert line["Loss/D/classifier"] > 0 and line["Loss/G/classifier"] > 0
        assert line["Loss/D/total"] == pytest.approx(
            line["Loss/D/real"] + line["Loss/D/fake"] + 0.5 * line["Loss/D/classifier"],
            rel=1e-5)
    payload = ckpt.load_checkpoint(ckpt.step_path(run_dir, 4))
    assert "classifier.parametrizations.weight.original" in payload["discriminator"]


def test_resume_is_bitwise_exact(tmp_path, tiny_config_path):
    straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}"])
    train(straight, show_progress=False)

    halves = f"run_dir={tmp_path / 'halves'}"
    train(load_config(tiny_config_path, [halves, "train.total_steps=2"]), show_progress=False)
    train(load_config(tiny_config_path, [halves]), resume=True, show_progress=False)

    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 4)),
                               ckpt.load_checkpoint(ckpt.step_path(tmp_path / "halves", 4)))
    assert read_jsonl(tmp_path / "straight" / "stats.jsonl")[-1]["Loss/G/total"] == \
        read_jsonl(tmp_path / "halves" / "stats.jsonl")[-1]["Loss/G/total"]


def test_resume_refuses_a_changed_architecture(tmp_path, tiny_config_path):
    train(load_config(tiny_config_path, ["train.total_steps=2"]), show_progress=False)
    changed_config = load_config(tiny_config_path, ["model.attention=self",
                                                    "model.memory_size=16"])
    with pytest.raises(UserError) as caught:
        train(changed_config, resume=True, show_progress=False)
    message = str(caught.value)
    assert "model.attention: 'external' -> 'self'" in message
    assert "model.memory_size: 8 -> 16" in message


def test_run_folder_holding_a_run_is_not_overwritten(tiny_config_path):
    config = load_config(tiny_config_path, ["train.total_steps=2"])
    train(config, show_progress=False)
    before = ckpt.step_path(config.run_dir, 2).read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(config, show_progress=False)
    assert ckpt.step_path(config.run_dir, 2).read_bytes() == before


@pytest.fixture
def g_loss_nan_at_step_3(monkeypatch):
    """The hinge G loss, NaN on its third call (the generator update of step 3)."""
    calls = {"n": 0}

    def exploding_g_loss(fake_logits):
        calls["n"] += 1
        loss = g_hinge_loss(fake_logits)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setitem(LOSSES, "hinge", (d_hinge_loss, exploding_g_loss))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config_path,
                                                                 g_loss_nan_at_step_3):
    config = load_config(tiny_config_path)
    with pytest.raises(NonFiniteLoss, match="step 3: the generator loss is not finite"):
        train(config, show_progress=False)
    assert [step for step, _ in ckpt.step_checkpoints(config.run_dir)] == [2]


def test_nonfinite_skip_continues(tiny_config_path, g_loss_nan_at_step_3):
    result = train(load_config(tiny_config_path, ["train.nonfinite=skip"]), show_progress=False)
    assert result.step == 4
    payload = ckpt.load_checkpoint(ckpt.step_path(result.run_dir, 4))
    assert all(torch.isfinite(v).all() for v in payload["generator"].values()
               if v.is_floating_point())


def test_ema_generator_is_saved_and_differs_from_raw(tiny_config_path):
    result = train(load_config(tiny_config_path, ["train.ema_decay=0.9"]), show_progress=False)
    payload = ckpt.load_checkpoint(ckpt.step_path(result.run_dir, 4))
    ema, raw = payload["generator_ema"], payload["generator"]
    assert ema.keys() == raw.keys()
    weight = next(name for name in raw if name.endswith("parametrizations.weight.original"))
    assert not torch.equal(ema[weight], raw[weight])


def test_same_seed_same_run(tmp_path, tiny_config_path):
    runs = []
    for name in ("a", "b"):
        config = load_config(tiny_config_path, [f"run_dir={tmp_path / name}",
                                                "train.total_steps=2"])
        train(config, show_progress=False)
        runs.append(ckpt.load_checkpoint(ckpt.step_path(config.run_dir, 2))["generator"])
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name])


@pytest.mark.slow
def test_compiled_first_step_matches_eager(tmp_path, tiny_config_path, monkeypatch):
    # Dynamo tracing and AOT autograd, where our modules meet the compiler (parametrizations,
    # in-place power-iteration updates, autocast regions); inductor's C++ code generation
    # would add minutes on 2 cores; benchmarks/compile_agreement.py checks it the same way.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    steps = ["train.total_steps=1", "train.n_dis=1", "train.checkpoint_every=1"]
    results = {}
    for compiled in (False, True):
        config = load_config(tiny_config_path, [f"run_dir={tmp_path / str(compiled)}",
                                                f"train.compile={str(compiled).lower()}", *steps])
        try:
            train(config, show_progress=False)
        except Exception as error:  # noqa: BLE001 - report why compile cannot run here
            if not compiled:
                raise
            pytest.skip(f"torch.compile does not work on this machine: {error}")
        results[compiled] = ckpt.load_checkpoint(ckpt.step_path(config.run_dir, 1))
    for network in ("generator", "discriminator"):
        for name, value in results[False][network].items():
            torch.testing.assert_close(results[True][network][name], value, rtol=1e-4,
                                       atol=1e-5, msg=f"{network}.{name}")


@pytest.mark.parametrize("asked, device, expected", [
    ("auto", "cpu", "fp32"), ("bf16", "cpu", "bf16"), ("fp16", "cpu", "fp16"),
    ("fp32", "cpu", "fp32")])
def test_precision_resolution(asked, device, expected):
    assert resolve_precision(asked, torch.device(device)) == expected


def test_speed_switches_train_on_cpu(tiny_config_path):
    # bf16 autocast, channels_last and fused Adam together: the GPU defaults, run where PyTorch
    # allows it on CPU.
    switches = ["train.precision=bf16", "train.channels_last=true", "train.fused_adam=true",
                "train.total_steps=2"]
    result = train(load_config(tiny_config_path, switches), show_progress=False)
    payload = ckpt.load_checkpoint(ckpt.step_path(result.run_dir, 2))
    weights = [value for value in payload["generator"].values() if value.is_floating_point()]
    assert all(torch.isfinite(value).all() for value in weights)
    assert all(value.dtype == torch.float32 for value in weights)  # autocast leaves weights fp32


def test_logged_discriminator_losses_are_the_mean_over_every_d_update(tiny_config_path,
                                                                      monkeypatch):
    from eagan.train import steps

    reported = []

    def recording_step(*args, **kwargs):
        losses = discriminator_step(*args, **kwargs)
        reported.append({name: value.item() for name, value in losses.items()})
        return losses

    monkeypatch.setattr(steps, "discriminator_step", recording_step)
    config = load_config(tiny_config_path, ["train.n_dis=3", "train.total_steps=2",
                                            "train.log_every=2"])
    train(config, show_progress=False)
    assert len(reported) == 6
    logged = read_jsonl(Path(config.run_dir) / "stats.jsonl")[-1]
    for name in ("Loss/D/real", "Loss/D/fake", "Loss/D/total"):
        values = [losses[name] for losses in reported]
        assert logged[name] == pytest.approx(sum(values) / len(values), rel=1e-6)
        assert logged[name] != pytest.approx(values[-1], rel=1e-6)  # not the last update's


@pytest.mark.parametrize("use_ema", [True, False])
def test_training_evaluates_the_generator_eval_use_ema_names(tiny_config_path, use_ema):
    evaluated = []

    def evaluate(generator, step, rank, world_size):
        # The EMA copy is the one G whose weights take no gradient.
        evaluated.append(next(generator.parameters()).requires_grad)
        return evaluation_result(1.0, ema=not evaluated[-1])

    config = load_config(tiny_config_path, ["train.ema_decay=0.9", "eval.every=2",
                                            f"eval.use_ema={str(use_ema).lower()}"])
    devices = []

    def make_evaluator(device):
        devices.append(device)
        return evaluate

    train(config, show_progress=False, make_evaluator=make_evaluator)
    assert evaluated == [not use_ema, not use_ema]
    assert devices == [torch.device("cpu")]  # made once, for the device training runs on
