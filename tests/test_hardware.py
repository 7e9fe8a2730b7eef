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
import settings
import utils

AVX512_BF16 = hardware.Hardware(cpu_bf16_units=True, onednn_avx512=True)
CAPPED = hardware.Hardware(cpu_bf16_units=True, onednn_avx512=False)  # ONEDNN_MAX_CPU_ISA=AVX2
AVX2 = hardware.Hardware()
T4 = hardware.Hardware(cuda=True, cuda_capability=(7, 5))
H200 = hardware.Hardware(cuda=True, cuda_capability=(9, 0))
MAC = hardware.Hardware(mps=True)


def settle(hw, kind="cpu", **flags) -> settings.Effective:
    return settings.settle(hw, device=kind, **flags)


@pytest.mark.parametrize(
    "hw, amp_dtype, why",
    [
        (AVX512_BF16, "bf16", "this CPU computes bf16 natively"),
        (CAPPED, None, "oneDNN is capped below AVX-512"),
        (AVX2, None, "this CPU has no native bf16"),
    ],
)
def test_cpu_precision_follows_native_bf16(hw, amp_dtype, why):
    chosen = settle(hw, model="sigmoid_cnn")
    assert chosen.amp_dtype == amp_dtype and why in chosen.reasons["precision"]
    assert chosen.reasons["precision"].startswith("bf16" if amp_dtype else "fp32")
    assert chosen.warnings == () and not chosen.scaler


def test_cpu_layout_is_channels_last_except_facade_fcn_training_without_avx512():
    for model in ("sigmoid_cnn", "fashion_net", "unet", "facade_fcn"):
        fast = settle(AVX512_BF16, model=model)
        assert (fast.channels_last, fast.eval_channels_last) == (True, True)
        slow = settle(AVX2, model=model)
        assert slow.eval_channels_last is True
        assert slow.channels_last is (model != "facade_fcn"), model
    reasons = settle(AVX2, model="facade_fcn").reasons
    assert "standard layout for training" in reasons["memory_format"]


def test_flags_override_the_policy():
    chosen = settle(AVX2, model="facade_fcn", amp=False, channels_last=True)
    assert (chosen.amp_dtype, chosen.channels_last, chosen.eval_channels_last) == (None, True, True)
    assert chosen.reasons["memory_format"].startswith("channels-last (--channels-last)")
    chosen = settle(AVX512_BF16, model="unet", channels_last=False)
    assert (chosen.channels_last, chosen.eval_channels_last) == (False, False)


def test_forced_amp_on_emulated_bf16_warns_in_one_line():
    for kind, hw in (("cpu", AVX2), ("cpu", CAPPED), ("cuda", T4)):
        chosen = settle(hw, kind, amp=True)
        assert chosen.amp_dtype == "bf16"
        (warning,) = chosen.warnings
        assert warning.startswith("warning: bf16 autocast was asked for") and "\n" not in warning
    assert settle(AVX512_BF16, amp=True).warnings == ()
    assert settle(T4, "cuda", amp=True, amp_dtype="fp16").warnings == ()


def test_fp16_alone_asks_for_fp16_with_a_scaler_and_warns_on_the_cpu():
    """--amp-dtype fp16 without --amp used to be recorded and ignored (bf16 or fp32 ran)."""
    for kind, hw in (("cuda", T4), ("cuda", H200), ("cpu", AVX512_BF16), ("cpu", AVX2)):
        chosen = settle(hw, kind, amp_dtype="fp16")
        assert chosen.amp_dtype == "fp16" and chosen.scaler
        assert len(chosen.warnings) == (kind == "cpu")
    with pytest.raises(utils.UserError, match="--no-amp contradicts --amp-dtype fp16"):
        settle(T4, "cuda", amp=False, amp_dtype="fp16")


def test_cuda_bf16_only_from_compute_capability_8():
    t4 = settle(T4, "cuda", model="facade_fcn")
    assert t4.amp_dtype is None and "compute capability 7.5" in t4.reasons["precision"]
    assert t4.warnings == ("hint: --amp --amp-dtype fp16 is faster than fp32 on this GPU",)
    h200 = settle(H200, "cuda", model="facade_fcn")
    assert h200.amp_dtype == "bf16" and "compute capability 9.0" in h200.reasons["precision"]
    assert h200.warnings == ()
    assert t4.channels_last and h200.channels_last and h200.eval_channels_last


def test_auto_device_order_and_mps_defaults():
    assert hardware.pick_device("auto", hardware.Hardware(cuda=True, mps=True))[0] == "cuda"
    assert hardware.pick_device("auto", MAC)[0] == "mps"
    assert hardware.pick_device("auto", AVX2)[0] == "cpu"
    assert hardware.pick_device("cpu", H200)[0] == "cpu"
    mac = settings.settle(MAC, device="auto", model="unet")
    assert mac.device == "mps" and mac.amp_dtype is None
    assert not mac.channels_last and not mac.eval_channels_last
    assert "batch norm" in mac.reasons["memory_format"]
    with pytest.raises(utils.UserError, match="autocast on MPS is not supported"):
        settings.settle(MAC, device="auto", amp=True)


def test_unavailable_devices_are_user_errors():
    with pytest.raises(utils.UserError, match="MPS is not available"):
        settings.settle(AVX2, device="mps")
    with pytest.raises(utils.UserError, match="CUDA is not available"):
        settings.settle(AVX2, device="cuda")


def test_a_disabled_autocast_is_never_constructed(monkeypatch):
    """fp32 runs use no autocast object at all: before torch 2.5, constructing a disabled
    autocast for MPS raised, so a Mac run stopped at its first forward pass."""
    made = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: made.append(a) or pytest.fail("made"))
    rt = utils.settled_runtime(AVX2, device="cpu")
    with rt.autocast():
        pass
    assert made == [] and rt.amp_dtype is None


def test_onednn_cap_is_read_from_the_environment():
    """Under ONEDNN_MAX_CPU_ISA=AVX2 oneDNN may not use AVX-512, so bf16 is never native."""
    code = "import hardware; h = hardware.read_hardware(); print(h.onednn_avx512)"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    root = os.path.dirname(hardware.__file__)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
    assert settle(CAPPED, model="sigmoid_cnn").amp_dtype is None


def test_avx512_is_read_from_the_cpu_flags_and_the_cap_not_from_onednns_bf16_answer():
    """Laptop chips with AVX2-VNNI-2 answer True to oneDNN's bf16 check without any AVX-512:
    the policy must still treat them as AVX2 CPUs (layout, micro-batches)."""
    avx512 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}
    laptop = {"avx2", "fma", "avx_vnni", "avx_vnni_int8", "avx_ne_convert"}
    assert hardware.onednn_uses_avx512(avx512, None)
    assert hardware.onednn_uses_avx512(avx512, "AVX512_CORE_BF16")
    assert hardware.onednn_uses_avx512(avx512, "avx10_1_512_amx")
    assert not hardware.onednn_uses_avx512(avx512, "AVX2")
    assert not hardware.onednn_uses_avx512(avx512, "AVX2_VNNI_2")
    assert not hardware.onednn_uses_avx512(laptop, None)
    assert not hardware.onednn_uses_avx512({"avx512f"}, None)  # not the whole avx512_core


def test_eval_layout_switches_the_model_and_restores_it():
    """Training in the standard layout and evaluating in channels-last: the parameters change
    format inside the block only, keep their identity, and the scores agree within fp32
    rounding."""
    torch.manual_seed(0)
    net = models.build_model("facade_fcn", num_classes=5).eval()
    rt = utils.settled_runtime(AVX2, device="cpu", model="facade_fcn")
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
        rt = utils.settled_runtime(AVX2, device="cpu", model="facade_fcn", micro_batch=micro or 0)
        assert rt.micro_batch == micro
        net.register_forward_hook(lambda *_, m=micro: calls.append(m))
        ce = losses.CrossEntropy()
        batch_losses.append(engine.forward_backward(net, x, y, ce, rt, rt.micro_batch).item())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert calls == [None, 1, 1, 1, 1]
    assert batch_losses[1] == pytest.approx(batch_losses[0], rel=1e-5)
    for whole, chunked in zip(*grads):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
    weighted = losses.CrossEntropyDice(torch.ones(5), 5)
    assert not weighted.splits_exactly and losses.CrossEntropy().splits_exactly
    assert models.has_batch_norm("unet", num_classes=5, width=4, depth=2)
    assert not models.has_batch_norm("facade_fcn", num_classes=5)
    # Where the batch does not split exactly (batch norm, weighted loss), the policy and the
    # flag alike give whole batches, and the recorded setting and its reason say so.
    for requested in (None, 4):
        whole = settle(AVX2, model="facade_fcn", micro_batch=requested, batch_splits=False)
        assert whole.micro_batch == 0 and whole.record()["micro_batch"] == 0
    assert "--micro-batch 4 refused" in whole.reasons["micro_batch"]


def test_the_policy_picks_micro_batches_for_facade_fcn_only_without_avx512():
    assert settle(AVX2, model="facade_fcn").micro_batch == 1
    assert settle(AVX2, model="unet").micro_batch == 0
    assert settle(AVX512_BF16, model="facade_fcn").micro_batch == 0
    assert settle(T4, "cuda", model="facade_fcn").micro_batch == 0
    assert settle(AVX2, model="facade_fcn", micro_batch=0).micro_batch == 0
