"""Images/s of a few training steps and an evaluation pass of every model, in fp32 and (where
native) bf16, each in the standard layout and channels-last, on random data of the real shapes:
the survey behind hardware.py's CPU choices. Run it natively and under
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, one process at a time:

    python scripts/layout_survey.py [MODEL ...]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import datasets  # noqa: E402
import engine  # noqa: E402
import hardware  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import optimizers  # noqa: E402
import utils  # noqa: E402

# model: (constructor kwargs, image shape, train batch, eval batch, train steps, eval images)
SPEC = {
    "sigmoid_cnn": ({}, (1, 28, 28), 500, 2000, 6, 4000),
    "fashion_net": ({"width": 48}, (1, 28, 28), 128, 2000, 6, 2000),
    "facade_fcn": ({}, (3, 256, 256), 8, 1, 2, 6),
    "unet": ({"width": 16, "depth": 4}, (3, 128, 128), 16, 1, 6, 4),  # the CPU recipe
}


def survey(name: str, amps: list) -> None:
    kwargs, shape, train_batch, eval_batch, steps, eval_count = SPEC[name]
    classes = 10 if shape[0] == 1 else 5
    g = torch.Generator().manual_seed(0)
    n = max(train_batch * (steps + 2), eval_count)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,) if classes == 10 else (n, *shape[1:]), generator=g)
    eval_shape = (3, 256, 256) if name == "unet" else shape  # the U-Net is tested at full size
    ex = torch.randint(0, 256, (eval_count, *eval_shape), dtype=torch.uint8, generator=g)
    ey = torch.randint(0, classes, (eval_count,) if classes == 10 else (eval_count, 256, 256))
    norm = {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]}
    for amp in amps:
        for cl in (False, True):
            rt = utils.settled_runtime(device="cpu", amp=amp, channels_last=cl, progress=False)
            torch.manual_seed(0)
            net, _ = utils.prepare_model(
                models.build_model(name, num_classes=classes, **kwargs), rt
            )
            opt = torch.optim.Adam(net.parameters(), 1e-3)
            sched = optimizers.build_scheduler(opt, "constant", 100)
            loader = datasets.TensorLoader(x, y, train_batch, **norm, train=True)
            loss = losses.CrossEntropy()
            engine.train_one_epoch(net, loader, loss, opt, sched, rt, 0, max_steps=1)  # warm-up
            train = engine.train_one_epoch(net, loader, loss, opt, sched, rt, 0, max_steps=steps)
            eval_loader = datasets.TensorLoader(ex, ey, eval_batch, **norm, train=False)
            engine.evaluate(net, eval_loader, loss, rt)  # warm-up
            rate = engine.evaluate(net, eval_loader, loss, rt)["images_per_s"]
            label = ("bf16" if amp else "fp32") + ("+cl" if cl else "")
            print(f"{name:12s} {label:8s} train {train['images_per_s']:8.1f} img/s  "
                  f"eval {rate:8.1f} img/s", flush=True)  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    bf16 = hardware.native_bf16("cpu", hardware.read_hardware())[0]
    print(f"CPU: {hardware.describe_cpu_isa()}, bf16 native: {bf16}")
    for model in sys.argv[1:] or list(SPEC):
        survey(model, [False, True] if bf16 else [False])
