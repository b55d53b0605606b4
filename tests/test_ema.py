"""ModelEMA: closed-form averages, the RQ-Transformer warm-up against official weights, swap-in, resume, DDP."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from common.ema import ModelEMA
from common.errors import CheckpointError, ConfigError

DATA = os.path.join(os.path.dirname(__file__), "data", "ema")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)

    def forward(self, x):
        return self.norm(self.linear(x))


def fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def module_holding(state: dict[str, torch.Tensor]) -> nn.Module:
    """A bare module tree with one parameter per state-dict entry, under the same names."""
    root = nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(tensor.clone()))
    return root


def test_ema_after_n_updates_equals_closed_form():
    model = Tiny()
    fill(model, 2.0)
    ema = ModelEMA(model, decay=0.9)
    fill(model, -1.0)
    model.train()
    model(torch.randn(8, 3))  # moves the BatchNorm running statistics
    for _ in range(5):
        ema.update(model)
    expected = 0.9 ** 5 * 2.0 + (1 - 0.9 ** 5) * -1.0
    torch.testing.assert_close(ema.shadow["linear.weight"], torch.full((4, 3), expected))
    torch.testing.assert_close(ema.shadow["norm.bias"], torch.full((4,), expected))
    assert torch.equal(ema.shadow["frozen"], torch.full((2,), -1.0))  # frozen: copied, not averaged
    for name in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        assert torch.equal(ema.shadow[name], model.state_dict()[name])
    assert ema.num_updates == 5


def test_rqvae_warmup_decay_schedule():
    ema = ModelEMA(nn.Linear(1, 1), decay=0.999, warmup="rqvae")
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(nn.Linear(1, 1))
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 10 ** 6
    assert ema.current_decay() == 0.999


def test_rqvae_warmup_reproduces_official_rqtransformer_ema():
    data = torch.load(os.path.join(DATA, "rqtransformer_tiny_ema.pt"), weights_only=True)
    generator = torch.Generator().manual_seed(77)
    shifts = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in data["state_dict"].items()}
    model = module_holding({k: v - shifts[k] for k, v in data["state_dict"].items()})
    ema = ModelEMA(model, decay=0.999, warmup="rqvae")
    model.load_state_dict(data["state_dict"])
    ema.update(model)
    for name, official in data["state_dict_ema"].items():
        torch.testing.assert_close(ema.shadow[name], official, rtol=0, atol=1e-6)


def test_swapped_in_uses_ema_weights_then_restores_raw_weights():
    model = Tiny()
    fill(model, 1.0)
    ema = ModelEMA(model, decay=0.5)
    fill(model, 3.0)
    ema.update(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        assert torch.equal(model.linear.weight, torch.full((4, 3), 2.0))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw[name])
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in(model):
        raise RuntimeError("inside")
    assert torch.equal(model.linear.weight, raw["linear.weight"])
    ema.copy_to(model)
    assert torch.equal(model.linear.weight, torch.full((4, 3), 2.0))


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    straight = ModelEMA(model, decay=0.9, warmup="rqvae")
    resumed = ModelEMA(Tiny(), decay=0.9, warmup="rqvae")
    weights = [{k: torch.randn_like(v) for k, v in model.named_parameters()} for _ in range(4)]
    for step, values in enumerate(weights):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(values[name])
        straight.update(model)
        if step == 1:
            torch.save(straight.state_dict(), tmp_path / "ema.pt")
            resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
        elif step > 1:
            resumed.update(model)
    assert resumed.num_updates == straight.num_updates == 4
    for name, tensor in straight.shadow.items():
        assert torch.equal(resumed.shadow[name], tensor)


def test_load_state_dict_of_another_model_is_refused():
    ema = ModelEMA(Tiny(), decay=0.9)
    with pytest.raises(CheckpointError, match="linear.weight"):
        ema.load_state_dict(ModelEMA(nn.Linear(3, 5), decay=0.9).state_dict())


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="warmup"):
        ModelEMA(Tiny(), decay=0.9, warmup="lucky")
    with pytest.raises(ConfigError, match="decay"):
        ModelEMA(Tiny(), decay=1.5)


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        inner = Tiny()
        fill(inner, 1.0)
        wrapped = nn.parallel.DistributedDataParallel(inner)
        ema = ModelEMA(wrapped, decay=0.5)
        assert set(ema.shadow) == set(inner.state_dict())
        fill(inner, 3.0)
        ema.update(wrapped)
        with ema.swapped_in(wrapped):
            assert torch.equal(inner.linear.bias, torch.full((4,), 2.0))
        assert torch.equal(inner.linear.bias, torch.full((4,), 3.0))
    finally:
        if started_here:
            dist.destroy_process_group()
