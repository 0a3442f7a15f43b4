"""train.precision: a real bf16 training step on the CPU, float32 geometry under autocast, TF32 flags restored."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from jimray.config import ModelConfig
from jimray.model import JimNet
from jimray.precision import autocast, float32_region, tf32_scope, uses_tf32
from jimray.train.step import pair_step

# jimray.bench.common.TINY_TRAINING's model
TINY = ModelConfig(channels=[4, 8], feature_size=4, feature_dim=8, regressor_channels=8, local_radius=1,
                   dilations=[1, 2])  # fmt: skip
_HALF = (torch.bfloat16, torch.float16)


class HalfGeometryCalls(TorchFunctionMode):
    """Records FFT, linalg and grid_sample calls that get a half-precision tensor: on CUDA these fail (cuFFT and
    linalg.inv have no bfloat16; grid_sample needs one dtype), while CPU autocast would quietly upcast them."""

    def __init__(self):
        super().__init__()
        self.calls: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{getattr(func, '__module__', '') or ''}.{getattr(func, '__name__', func)}"
        if "fft" in name or "linalg" in name or name.endswith("grid_sample"):
            if any(isinstance(a, torch.Tensor) and a.dtype in _HALF for a in (*args, *kwargs.values())):
                self.calls.add(name)
        return func(*args, **kwargs)


def _batch(box: int = 16, b: int = 4):
    gen = torch.Generator().manual_seed(1)
    source, target = torch.randn(2, b, box, box, box, generator=gen).unbind(0)
    tilts = torch.full((b,), 60.0)
    return source, target, tilts, torch.tensor([0, 1, 2, 0])[:b]


def _step(model, precision: str) -> dict[str, torch.Tensor]:
    source, target, tilts, labels = _batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return pair_step(model, optimizer, source, target, tilts, tilts, labels, [1.0, 1.0], 0.0, 0.25, precision)


def _model(seed: int = 0) -> JimNet:
    torch.manual_seed(seed)
    return JimNet(TINY, 3)


def test_bf16_training_step_on_cpu():
    """One real step under bf16 autocast: finite loss near the fp32 one, weights move and stay float32, and the
    geometry (FFTs, resampling, rigid fits) never sees a bfloat16 tensor."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _step(_model(), "fp32")
    with HalfGeometryCalls() as check:
        terms = _step(model, "bf16")
    assert check.calls == set()
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.values())
    assert math.isclose(float(terms["total"]), float(reference["total"]), rel_tol=0.05)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in model.parameters())  # fmt: skip


def test_bf16_forward_keeps_poses_and_warps_in_float32():
    source, target, _, _ = _batch(b=2)
    with torch.no_grad(), autocast("bf16", "cpu"):
        out = _model()(source, target)
    assert all(r.dtype == torch.float32 for r in out.rotations + out.shifts + out.warped)
    eye = torch.eye(3).expand(2, 3, 3)
    assert torch.allclose(out.rotations[-1] @ out.rotations[-1].transpose(1, 2), eye, atol=1e-5)


def test_fp32_step_is_the_plain_step():
    """The default changes nothing: pair_step at fp32 gives the loss of a plain forward + loss."""
    from jimray.model.losses import jimnet_loss

    source, target, tilts, labels = _batch()
    model = _model()
    with torch.no_grad():
        plain = jimnet_loss(model(source, target), source, target, tilts, tilts, labels, [1.0, 1.0], 0.0, 0.25)
    assert torch.equal(_step(_model(), "fp32")["total"], plain["total"])


def test_float32_region_upcasts_only_under_autocast():
    seen = []

    @float32_region
    def probe(x, y=None):
        seen.append((x.dtype, y.dtype, torch.is_autocast_enabled("cpu")))
        return x

    half = torch.ones(2, dtype=torch.bfloat16)
    assert probe(half, y=half) is half and seen[-1] == (torch.bfloat16, torch.bfloat16, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probe(half, y=half)
    assert out.dtype == torch.float32 and seen[-1] == (torch.float32, torch.float32, False)


def test_tf32_scope_sets_and_restores_the_flags():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with tf32_scope(True):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with tf32_scope(False):
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        with tf32_scope(None):
            assert matmul.fp32_precision == "tf32"
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    assert uses_tf32("tf32") is True and uses_tf32("bf16") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("fp16", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_training_step_on_cuda(precision):
    """The same step on the GPU: cuFFT, cuBLAS and grid_sample accept what bf16 autocast hands them."""
    model = _model().cuda()
    source, target, tilts, labels = (x.cuda() for x in _batch())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    terms = pair_step(model, optimizer, source, target, tilts, tilts, labels, [1.0, 1.0], 0.0, 0.25, precision)
    reference = _step(_model(), "fp32")
    assert all(torch.isfinite(v) for v in terms.values())
    assert math.isclose(float(terms["total"]), float(reference["total"]), rel_tol=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_pretraining_plan_checks_its_precision():
    from jimray.train.pretrain import PairTraining

    with pytest.raises(ValueError, match="precision must be one of"):
        PairTraining(snr=0.1, tilt_range_degrees=60.0, curriculum=[(30.0, 1)], precision="fp16")
