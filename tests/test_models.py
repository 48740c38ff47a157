"""The example MANA network: one training step of the small configuration, on both backends."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vsr_kernels.models import MANA

CLIP = (1, 3, 3, 16, 16)


def _clip(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(CLIP, generator=generator, dtype=dtype)


def _training_step(model, frames):
    """Forward, L1 image loss plus memory loss, backward; returns (sr, loss)."""
    sr, memory_loss = model(frames)
    target = F.interpolate(frames[:, model.center], scale_factor=4, mode="bicubic", align_corners=False)
    loss = (sr - target).abs().mean() + memory_loss
    loss.backward()
    return sr, loss


def test_small_training_step():
    torch.manual_seed(0)
    model = MANA.small(backend="cpu")
    sr, loss = _training_step(model, _clip())
    assert sr.shape == (1, 3, 64, 64)
    assert torch.isfinite(loss)
    first_conv = model.encoder[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_small_training_step_under_cpu_autocast():
    # bfloat16 convolutions feed the attention op, which runs them in float32 on CPU.
    torch.manual_seed(0)
    model = MANA.small(backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sr, loss = _training_step(model, _clip())
    assert sr.shape == (1, 3, 64, 64)
    assert torch.isfinite(loss)
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_reference_and_cpu_backends_agree_float64():
    results = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        model = MANA.small(backend=backend).double()
        # Fresh attention layers add zero; wake their output convs so the op shapes the result.
        torch.manual_seed(1)
        for conv in (model.cross_frame_attention.fuse, model.memory_attention.project):
            nn.init.normal_(conv.weight, std=0.1)
            nn.init.normal_(conv.bias, std=0.1)
        sr, loss = _training_step(model, _clip(torch.float64))
        results.append((sr, loss, {n: p.grad for n, p in model.named_parameters()}))
    (sr_ref, loss_ref, grads_ref), (sr_cpu, loss_cpu, grads_cpu) = results
    torch.testing.assert_close(sr_cpu, sr_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_cpu, loss_ref, rtol=1e-10, atol=1e-10)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_cpu[name], grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("shape", [(1, 5, 3, 16, 16), (1, 3, 1, 16, 16), (3, 3, 16, 16)])
def test_rejects_clip_of_wrong_shape(shape):
    with pytest.raises(ValueError, match="frames"):
        MANA.small(backend="cpu")(torch.rand(shape))


# DKSAN (vsr_kernels.models.DKSAN): forward/backward of the small configuration, x4 and x16.

@pytest.fixture
def one_thread():
    # Tiny convolutions on a shared 2-core machine: one thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("scale,size", [(4, (6, 8)), (16, (2, 3))])
def test_dksan_forward_backward(scale, size):
    import warnings

    from vsr_kernels import nn as vnn
    from vsr_kernels.models import DKSAN

    torch.manual_seed(0)
    model = DKSAN.small(scale=scale)
    assert len(model.levels) == {4: 2, 16: 4}[scale]
    H, W = size
    frames = torch.rand(2, 3, 3, H, W, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # backend="auto" may fall back to the reference
        warnings.filterwarnings("ignore", "vsr_kernels.* falls back", RuntimeWarning)
        sr = model(frames)
        assert sr.shape == (2, 3, scale * H, scale * W) and torch.isfinite(sr).all()
        # Fresh: conv_last's output is small, the global residual dominates.
        base = F.interpolate(frames[:, 1], scale_factor=scale, mode="bilinear", align_corners=False)
        assert (sr - base).abs().mean() < 1
        loss = F.l1_loss(sr, torch.rand_like(sr))
        loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.align.dkconv.conv_kernel_offset.weight.grad.abs().sum() > 0
    assert all(m.backend == "auto" for m in model.modules()
               if isinstance(m, (vnn.DeformKernelConv2d, vnn.ModulatedDeformConv2d)))


def test_dksan_rejects_bad_clips_and_scales():
    from vsr_kernels.models import DKSAN

    model = DKSAN.small(backend="reference")
    with pytest.raises(ValueError, match="num_frames"):
        model(torch.rand(1, 5, 3, 4, 4))
    with pytest.raises(ValueError, match="frames must be 5-D"):
        model(torch.rand(3, 3, 4, 4))
    with pytest.raises(ValueError, match="power of two"):
        DKSAN.small(scale=6)
