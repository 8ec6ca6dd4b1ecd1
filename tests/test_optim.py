"""The optimizer's device-side NaN guard leans on PyTorch internals (``_step_supports_amp_scaling`` and the
``found_inf`` input that GradScaler gives fused optimizers): these tests fail if PyTorch changes either."""

import torch

from ovenet.config import TrainConfig
from ovenet.engine.optim import build_optimizer, step_unless_nonfinite


def _model_with_grads():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).square().sum().backward()
    return model


def test_fused_sgd_is_what_the_guard_relies_on():
    optimizer = build_optimizer(_model_with_grads(), TrainConfig(lr=0.1))
    assert optimizer.defaults["fused"] is True
    assert optimizer._step_supports_amp_scaling is True  # PyTorch's marker that step() reads self.found_inf


def test_a_nonfinite_loss_leaves_weights_and_momentum_untouched():
    model = _model_with_grads()
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, momentum=0.9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf")):
        step_unless_nonfinite(optimizer, torch.tensor(bad))
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        for p, buf in zip(model.parameters(), buffers):
            assert torch.equal(optimizer.state[p]["momentum_buffer"], buf)
    assert not hasattr(optimizer, "found_inf")  # the flag never outlives the step

    step_unless_nonfinite(optimizer, torch.tensor(1.0))  # a finite loss steps: weight - lr * (grad + wd * weight)
    for name, p in model.named_parameters():
        expected = before[name] - 0.1 * (p.grad + 5e-4 * before[name])
        torch.testing.assert_close(p.detach(), expected)
