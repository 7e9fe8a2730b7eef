"""The hardware policy (hardware.py) on patched hardware facts: one test per kind of machine,
so the choices hold whatever machine runs the suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import engine
import hardware
import losses
import models
import utils

AVX512_BF16 = hardware.Hardware(cpu_bf16_units=True, onednn_avx512=True)
CAPPED = hardware.Hardware(cpu_bf16_units=True, onednn_avx512=False)  # ONEDNN_MAX_CPU_ISA=AVX2
AVX2 = hardware.Hardware()
T4 = hardware.Hardware(cuda=True, cuda_capability=(7, 5))
H200 = hardware.Hardware(cuda=True, cuda_capability=(9, 0))
MAC = hardware.Hardware(mps=True)


@pytest.mark.parametrize(
    "hw, amp_dtype, why",
    [
        (AVX512_BF16, torch.bfloat16, "this CPU computes bf16 natively"),
        (CAPPED, None, "oneDNN is capped below AVX-512"),
        (AVX2, None, "this CPU has no native bf16"),
    ],
)
def test_cpu_precision_follows_native_bf16(hw, amp_dtype, why):
    choice = hardware.choose("cpu", hw, model="sigmoid_cnn")
    assert choice.amp_dtype is amp_dtype and why in choice.precision
    assert choice.precision.startswith("bf16" if amp_dtype else "fp32")
    assert choice.warnings == ()


def test_cpu_layout_is_channels_last_except_facade_fcn_training_without_avx512():
    for model in ("sigmoid_cnn", "fashion_net", "unet", "facade_fcn"):
        fast = hardware.choose("cpu", AVX512_BF16, model=model)
        assert (fast.channels_last, fast.eval_channels_last) == (True, True)
        slow = hardware.choose("cpu", AVX2, model=model)
        assert slow.eval_channels_last is True
        assert slow.channels_last is (model != "facade_fcn"), model
    assert (
        "standard layout for training"
        in hardware.choose("cpu", AVX2, model="facade_fcn").memory_format
    )


def test_flags_override_the_policy():
    choice = hardware.choose("cpu", AVX2, model="facade_fcn", amp=False, channels_last=True)
    assert (choice.amp_dtype, choice.channels_last, choice.eval_channels_last) == (None, True, True)
    assert choice.memory_format.startswith("channels-last (--channels-last)")
    choice = hardware.choose("cpu", AVX512_BF16, model="unet", channels_last=False)
    assert (choice.channels_last, choice.eval_channels_last) == (False, False)


def test_forced_amp_on_emulated_bf16_warns_in_one_line():
    for kind, hw in (("cpu", AVX2), ("cpu", CAPPED), ("cuda", T4)):
        choice = hardware.choose(kind, hw, amp=True)
        assert choice.amp_dtype is torch.bfloat16
        (warning,) = choice.warnings
        assert warning.startswith("warning: --amp asks for bf16") and "\n" not in warning
    assert hardware.choose("cpu", AVX512_BF16, amp=True).warnings == ()
    assert hardware.choose("cuda", T4, amp=True, amp_dtype="fp16").warnings == ()


def test_cuda_bf16_only_from_compute_capability_8():
    t4 = hardware.choose("cuda", T4, model="facade_fcn")
    assert t4.amp_dtype is None and "compute capability 7.5" in t4.precision
    assert t4.warnings == ("hint: --amp --amp-dtype fp16 is faster than fp32 on this GPU",)
    h200 = hardware.choose("cuda", H200, model="facade_fcn")
    assert h200.amp_dtype is torch.bfloat16 and "compute capability 9.0" in h200.precision
    assert h200.warnings == ()
    assert t4.channels_last and h200.channels_last and h200.eval_channels_last
    fp16 = hardware.choose("cuda", T4, amp=True, amp_dtype="fp16")
    assert fp16.amp_dtype is torch.float16


def test_auto_device_order_and_mps_defaults():
    assert hardware.pick_device("auto", hardware.Hardware(cuda=True, mps=True)) == "cuda"
    assert hardware.pick_device("auto", MAC) == "mps"
    assert hardware.pick_device("auto", AVX2) == "cpu"
    assert hardware.pick_device("cpu", H200) == "cpu"
    rt = utils.setup_runtime(device="auto", model="unet", amp=None, channels_last=None, hw=MAC)
    assert rt.device.type == "mps" and rt.amp_dtype is None
    assert not rt.channels_last and not rt.eval_channels_last
    assert "batch norm" in rt.choice.memory_format


def test_unavailable_devices_and_fp16_off_cuda_are_user_errors():
    with pytest.raises(utils.UserError, match="MPS is not available"):
        utils.setup_runtime(device="mps", hw=AVX2)
    with pytest.raises(utils.UserError, match="CUDA is not available"):
        utils.setup_runtime(device="cuda", hw=AVX2)
    with pytest.raises(utils.UserError, match="fp16 needs CUDA"):
        utils.setup_runtime(device="auto", amp=True, amp_dtype="fp16", hw=MAC)


def test_onednn_cap_is_read_from_the_environment():
    """Under ONEDNN_MAX_CPU_ISA=AVX2 oneDNN may not use AVX-512, so bf16 is never native."""
    code = "import hardware; h = hardware.read_hardware(); print(h.onednn_avx512)"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    root = os.path.dirname(hardware.__file__)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
    rt = utils.setup_runtime(device="cpu", amp=None, hw=CAPPED)
    assert rt.amp_dtype is None


def test_eval_layout_switches_the_model_and_restores_it():
    """Training in the standard layout and evaluating in channels-last: the parameters change
    format inside the block only, keep their identity, and the scores agree within fp32
    rounding."""
    torch.manual_seed(0)
    net = models.build_model("facade_fcn", num_classes=5).eval()
    rt = utils.setup_runtime(device="cpu", model="facade_fcn", channels_last=None, hw=AVX2)
    assert (rt.channels_last, rt.eval_channels_last) == (False, True)
    params = list(net.parameters())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        standard = net(x)
        with rt.eval_layout(net):
            assert net.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
            fast = net(rt.to_input(x, train=False))
        assert fast.is_contiguous(memory_format=torch.channels_last)
    assert net.layers[0].weight.is_contiguous() and list(net.parameters()) == params
    with torch.inference_mode(), rt.eval_layout(net):  # as engine.evaluate calls it
        net(rt.to_input(x, train=False))
    assert not any(p.is_inference() for p in net.parameters())  # still trainable
    net.train()(x).sum().backward()
    assert not rt.to_input(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, standard, rtol=1e-4, atol=1e-5)


def test_micro_batches_give_the_whole_batch_gradient_and_only_where_exact():
    """facade_fcn's batch of 4 computed one image at a time: the same gradient and loss (fp32
    rounding); a class-weighted loss is not a plain mean, so it takes the batch whole."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4, 16, 16))
    grads, batch_losses, calls = [], [], []
    for micro in (None, 1):
        torch.manual_seed(1)
        net = models.build_model("facade_fcn", num_classes=5)
        rt = utils.setup_runtime(device="cpu", model="facade_fcn", micro_batch=micro or 0, hw=AVX2)
        assert rt.micro_batch == micro
        net.register_forward_hook(lambda *_, m=micro: calls.append(m))
        ce = losses.CrossEntropy()
        chunk = engine.chunk_size(net, ce, rt)
        batch_losses.append(engine.forward_backward(net, x, y, ce, rt, chunk).item())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert calls == [None, 1, 1, 1, 1]
    assert batch_losses[1] == pytest.approx(batch_losses[0], rel=1e-5)
    for whole, chunked in zip(*grads):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
    weighted = losses.CrossEntropyDice(torch.ones(5), 5)
    assert not weighted.splits_exactly and losses.CrossEntropy().splits_exactly
    calls.clear()
    engine.forward_backward(net, x, y, weighted, rt, engine.chunk_size(net, weighted, rt))
    assert calls == [1]  # one forward pass: the whole batch
    unet = models.build_model("unet", num_classes=5, width=4, depth=2)
    unet.register_forward_hook(lambda *_: calls.append("unet"))
    ce = losses.CrossEntropy()
    engine.forward_backward(unet, x, y, ce, rt, engine.chunk_size(unet, ce, rt))
    assert calls[1:] == ["unet"]  # batch norm: whole batches too


def test_the_policy_picks_micro_batches_for_facade_fcn_only_without_avx512():
    assert hardware.choose("cpu", AVX2, model="facade_fcn").micro_batch == 1
    assert hardware.choose("cpu", AVX2, model="unet").micro_batch is None
    assert hardware.choose("cpu", AVX512_BF16, model="facade_fcn").micro_batch is None
    assert hardware.choose("cuda", T4, model="facade_fcn").micro_batch is None
    assert hardware.choose("cpu", AVX2, model="facade_fcn", micro_batch=0).micro_batch == 0
