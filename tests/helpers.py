"""Checks and stand-ins shared by several test modules."""
import torch


def assert_same_training_state(a: dict, b: dict) -> None:
    """Networks and optimizer states bitwise equal."""
    assert a["step"] == b["step"]
    for network in ("generator", "discriminator"):
        for name, value in a[network].items():
            assert torch.equal(value, b[network][name]), f"{network}.{name}"
    for optimizer in ("optimizer_g", "optimizer_d"):
        for index, state in a[optimizer]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b[optimizer]["state"][index][name]), \
                    f"{optimizer}[{index}].{name}"


def evaluation_result(fid: float, ema: bool = False) -> dict:
    """What an evaluation hook returns, with made-up numbers, for tests of what the trainer
    does with a result (logging, best.pt) rather than of the metrics."""
    return {"fid": fid, "is_mean": 1.0, "is_std": 0.0, "elapsed_s": 0.0,
            "protocol": "standard", "num_samples": 8, "reference": {"name": "fake-test"},
            "bn_mode": "running", "ema": ema, "inception": {"weights_sha256": "0" * 64}}
