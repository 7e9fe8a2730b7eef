"""compare.py on hand-made run folders with known numbers: grouping by seed, mean ± sample std,
compare.json / compare.html / PNG output, and the one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import base64
import csv
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import compare
import compare_report
import settings

CLASSES_P1 = ["T-shirt/top", "Trouser", "Pullover"]
CLASSES_P2 = ["others", "facade", "window"]
CURVE_HEADER = [
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "epoch_time_s",
    "train_images_per_s",
]


# ----------------------------------------------------------------------------- fixtures
def make_run(
    folder: Path,
    *,
    task: str = "classification",
    seed: int = 0,
    headline: float = 0.9,
    per_class: list[float] | None = None,
    finished: bool = True,
    header: list[str] | None = None,
    epochs: int = 3,
    trained: int | None = None,
    results_extra: dict | None = None,
    **recipe,
) -> Path:
    """A run folder as the scripts write it: args.json, metrics.csv and (if finished)
    results.json, with the given recipe arguments and known numbers. ``trained``: the epochs
    actually trained (default: all ``epochs``; 0: none, as in an --eval-only folder)."""
    trained = epochs if trained is None else trained
    folder.mkdir(parents=True)
    args = {
        "model": "sigmoid_cnn",
        "epochs": epochs,
        "lr": 0.01,
        "batch_size": 500,
        "amp": False,
        "channels_last": False,
        "seed": seed,
        "output_dir": str(folder),
        "resume": None,
        "eval_only": None,
        "device": "auto",
        "threads": None,
        "no_progress": True,
        "time_limit": None,
        "environment": {
            "argv": ["x.py"],
            "python": "3.11",
            "torch": "2",
            "device": "cpu",
            "world_size": 1,
            "threads": 2,
            "amp": None,
        },
    }
    args.update(recipe)
    (folder / "args.json").write_text(json.dumps(args))
    header = header or CURVE_HEADER
    with (folder / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for epoch in range(1, trained + 1):
            loss = 1.0 / epoch + 0.01 * seed
            writer.writerow(
                {
                    "epoch": epoch,
                    "lr": 0.01,
                    "train_loss": loss,
                    "val_loss": loss + 0.1,
                    "train_accuracy": 1 - loss / 2,
                    "val_accuracy": 1 - loss / 2 - 0.05,
                    "epoch_time_s": 1.0,
                    "train_images_per_s": 100.0,
                }
            )
    if finished:
        names = CLASSES_P1 if task == "classification" else CLASSES_P2
        values = dict(zip(names, per_class or [headline] * len(names)))
        common = {
            "model": args["model"],
            "test_loss": 0.3,
            "checkpoint": str(folder / "checkpoints" / "best.pt"),
            "some_future_key": {"x": 1},
        }
        if trained:
            common |= {
                "epochs_trained": trained,
                "train_time_s": 60.0 * (seed + 1),
                "train_images_per_s": 1000.0 + seed,
            }
        if task == "classification":
            results = {
                "test_accuracy": headline,
                "mean_per_class_accuracy": headline,
                "per_class_accuracy": values,
                **common,
            }
        else:
            results = {
                "mean_ap": headline,
                "ap": values,
                "mean_ap_softmax": headline,
                "miou": 0.5,
                "pixel_accuracy": 0.8,
                "gflops_per_image": 1.0,
                **common,
            }
        (folder / "results.json").write_text(json.dumps(results | (results_extra or {})))
    return folder


def run_cli(argv: list[str]) -> int:
    try:
        return compare.main(argv)
    except SystemExit as exc:
        return exc.code


def assert_one_line_error(capsys, mentions: str | None = None) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    if mentions is not None:
        assert mentions in lines[0]
    return lines[0]


@pytest.fixture
def two_recipes(tmp_path) -> tuple[list[Path], dict[str, list[float]]]:
    """3 seeds of sigmoid_cnn lr=0.01 and 2 seeds of fashion_net lr=0.002."""
    scores = {"sigmoid": [0.90, 0.91, 0.93], "fashion": [0.94, 0.95]}
    runs = [
        make_run(
            tmp_path / "runs" / "sigmoid" / f"seed{s}",
            seed=s,
            headline=acc,
            per_class=[acc - 0.1, acc, acc + 0.01 * s],
        )
        for s, acc in enumerate(scores["sigmoid"])
    ]
    runs += [
        make_run(
            tmp_path / "runs" / "fashion" / f"seed{s}",
            seed=s,
            headline=acc,
            model="fashion_net",
            lr=0.002,
            epochs=4,
        )
        for s, acc in enumerate(scores["fashion"])
    ]
    return runs, scores


# ----------------------------------------------------------------------------- happy path
def test_groups_by_seed_with_numpy_mean_and_sample_std(two_recipes, tmp_path, capsys):
    runs, scores = two_recipes
    out = tmp_path / "cmp"
    assert run_cli([*map(str, runs), "--output-dir", str(out)]) == 0

    summary = json.loads((out / "compare.json").read_text())
    assert summary["task"] == "classification" and summary["headline"] == "test_accuracy"
    groups = {g["label"]: g for g in summary["groups"]}
    assert sorted(g["n"] for g in groups.values()) == [2, 3]
    sigmoid = next(g for g in groups.values() if g["n"] == 3)
    fashion = next(g for g in groups.values() if g["n"] == 2)
    assert "model=sigmoid_cnn" in sigmoid["label"] and "model=fashion_net" in fashion["label"]
    assert sigmoid["seeds"] == [0, 1, 2] and fashion["differs"]["lr"] == 0.002
    for group, values in ((sigmoid, scores["sigmoid"]), (fashion, scores["fashion"])):
        stats = group["metrics"]["test_accuracy"]
        assert stats["n"] == len(values) and stats["values"] == values
        assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert stats["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    shirts = [acc + 0.01 * s for s, acc in enumerate(scores["sigmoid"])]
    assert sigmoid["per_class"]["Pullover"]["std"] == pytest.approx(np.std(shirts, ddof=1))
    times = sigmoid["metrics"]["train_time_min"]
    assert times["mean"] == pytest.approx(2.0) and times["std"] == pytest.approx(1.0)

    # per run: unique names (both recipes have a seed0), group, seed, headline
    by_name = {r["name"]: r for r in summary["runs"]}
    assert set(by_name) == {
        f"{k}/seed{s}" for k, n in (("sigmoid", 3), ("fashion", 2)) for s in range(n)
    }
    assert by_name["fashion/seed1"]["headline"] == 0.95
    assert by_name["fashion/seed1"]["group"] == fashion["label"]
    assert by_name["sigmoid/seed2"]["metrics"]["epochs"] == 3

    # files: the PNGs, embedded in a self-contained html that names every run; no temp files
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_curves.png",
        "compare.html",
        "compare.json",
        "loss_curves.png",
    ]
    page = (out / "compare.html").read_text()
    for png in ("loss_curves.png", "accuracy_curves.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG")
        assert base64.b64encode(data).decode() in page
    assert all(name in page for name in by_name)
    assert "<h2>Groups</h2>" in page and "±" in page

    stdout = capsys.readouterr().out
    assert sigmoid["label"] in stdout and fashion["label"] in stdout
    assert str(out / "compare.html") in stdout
    mean, std = np.mean(scores["sigmoid"]), np.std(scores["sigmoid"], ddof=1)
    assert f"{mean:.4f} ± {std:.4f}" in stdout


def test_compare_runs_returns_what_compare_json_holds(tmp_path):
    runs = [make_run(tmp_path / f"seed{s}", seed=s, headline=0.8 + s / 100) for s in range(2)]
    summary = compare.compare_runs(runs, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "compare.json").read_text()) == summary
    [group] = summary["groups"]
    assert group["label"] == "sigmoid_cnn"  # one group: just the model name
    assert group["n"] == 2


def test_single_run_shows_value_without_std(tmp_path, capsys):
    run = make_run(tmp_path / "only", headline=0.875)
    assert run_cli([str(run), "--output-dir", str(tmp_path / "out")]) == 0
    group = json.loads((tmp_path / "out" / "compare.json").read_text())["groups"][0]
    assert group["metrics"]["test_accuracy"] == {
        "mean": 0.875,
        "std": None,
        "n": 1,
        "values": [0.875],
    }
    line = capsys.readouterr().out.splitlines()[1]
    assert line.rstrip().endswith("0.8750") and "±" not in line


def test_part2_folders_use_mean_ap_and_tolerate_missing_accuracy(tmp_path):
    header = ["epoch", "lr", "train_loss", "val_loss"]  # no accuracy columns
    aps = {"0.001": [0.50, 0.54], "0.002": [0.60, 0.61, 0.65]}
    runs = [
        make_run(
            tmp_path / f"lr{lr}_s{s}",
            task="segmentation",
            seed=s,
            headline=ap,
            model="unet",
            lr=float(lr),
            header=header,
        )
        for lr, values in aps.items()
        for s, ap in enumerate(values)
    ]
    # a newer folder that names its task explicitly still groups with the others
    results = json.loads((runs[0] / "results.json").read_text())
    (runs[0] / "results.json").write_text(json.dumps({**results, "task": "segmentation"}))

    summary = compare.compare_runs(runs, tmp_path / "out")
    assert summary["task"] == "segmentation" and summary["headline"] == "mean_ap"
    assert [g["label"] for g in summary["groups"]] == ["lr=0.001", "lr=0.002"]
    for group, values in zip(summary["groups"], aps.values()):
        assert group["metrics"]["mean_ap"]["mean"] == pytest.approx(np.mean(values))
        assert group["metrics"]["mean_ap"]["std"] == pytest.approx(np.std(values, ddof=1))
        assert set(group["per_class"]) == set(CLASSES_P2)
    assert summary["figures"] == {"loss": "loss_curves.png"}
    assert not (tmp_path / "out" / "accuracy_curves.png").exists()
    assert "No accuracy columns" in (tmp_path / "out" / "compare.html").read_text()


def test_default_output_dir_is_new_and_never_reused(tmp_path, monkeypatch, capsys):
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 1, 2, 3, 4, 5)

    run = make_run(tmp_path / "run", epochs=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "datetime", FrozenClock)
    assert run_cli([str(run)]) == 0
    assert run_cli([str(run)]) == 0
    root = tmp_path / "outputs" / "compare"
    assert sorted(p.name for p in root.iterdir()) == ["20240102-030405", "20240102-030405-2"]
    assert all((p / "compare.html").is_file() for p in root.iterdir())


# ----------------------------------------------------------------------------- grouping rules
def test_bookkeeping_args_do_not_split_a_group_but_numerics_do(tmp_path):
    base = make_run(tmp_path / "a", seed=0, finished=True)
    same = make_run(
        tmp_path / "b",
        seed=7,
        device="cuda",
        threads=4,
        compile=True,
        resume="x.pt",
        environment={"device": "cuda:0", "world_size": 1, "gpu": "H100"},
    )
    amp = make_run(tmp_path / "c", amp=True)
    ddp = make_run(tmp_path / "d", environment={"device": "cuda:0", "world_size": 2})
    groups = compare.group_runs(compare.load_runs([base, same, amp, ddp]))
    assert [len(g.runs) for g in groups] == [2, 1, 1]
    assert [g.label for g in groups] == [
        "precision=fp32 world_size=1",
        "precision=bf16 world_size=1",
        "precision=fp32 world_size=2",
    ]


def test_every_flag_the_table_ignores_is_ignored_and_measured_ones_count(tmp_path):
    base = make_run(tmp_path / "a", seed=0, micro_batch=0)
    ignored = {k for k, r in settings.FLAGS.items() if r.compare == settings.IGNORED}
    # precision: the next test; eval-only folders group apart (test_eval_only_folders_...)
    free = {k: f"other-{k}" for k in ignored - {"amp", "amp_dtype", "eval_only"}}
    assert {"channels_last", "micro_batch", "device", "compile", "stop_after_epochs"} <= free.keys()
    other = make_run(tmp_path / "b", seed=1, **free)
    tta = make_run(tmp_path / "c", seed=2, tta=True)
    groups = compare.group_runs(compare.load_runs([base, other, tta]))
    assert [[run.path for run in g.runs] for g in groups] == [[base, other], [tta]]
    assert [g.label for g in groups] == ["tta=-", "tta=True"]


def test_runs_group_by_the_precision_they_ran_in_not_the_flags_they_gave(tmp_path):
    ran_bf16 = {"amp_dtype": "bf16", "reasons": {}}
    policy = make_run(tmp_path / "policy", seed=0, amp=None, effective=ran_bf16)
    forced = make_run(tmp_path / "forced", seed=1, amp=True, effective=ran_bf16)
    older = make_run(tmp_path / "older", seed=2, amp=True, amp_dtype="bf16")  # no "effective"
    fp32 = make_run(tmp_path / "fp32", seed=3, amp=None, effective={"amp_dtype": None})
    groups = compare.group_runs(compare.load_runs([policy, forced, older, fp32]))
    assert [[run.path for run in g.runs] for g in groups] == [[policy, forced, older], [fp32]]
    assert [g.label for g in groups] == ["precision=bf16", "precision=fp32"]


def test_runs_that_trained_different_epochs_are_separate_groups(tmp_path):
    # one recipe and time limit; seeds 0 and 1 stopped after 4 of 6 epochs, seeds 0 and 1 ran all 6
    runs = [
        make_run(tmp_path / f"e{n}" / f"seed{s}", seed=s, epochs=6, trained=n, time_limit=30.0)
        for n in (4, 6)
        for s in (0, 1)
    ]
    groups = compare.compare_runs(runs, tmp_path / "out")["groups"]
    assert [(g["label"], g["seeds"]) for g in groups] == [
        ("epochs_trained=4", [0, 1]),
        ("epochs_trained=6", [0, 1]),
    ]
    assert [g["metrics"]["epochs"]["mean"] for g in groups] == [4, 6]


def test_a_time_boxed_or_extended_seed_joins_its_recipes_group(tmp_path):
    """Grouped by what was trained: a seed time-boxed with --stop-after-epochs and resumed to
    the end, or one whose time limit was not reached, is a seed of the plain recipe; a constant
    schedule extended on --resume joins the runs that trained as many epochs straight."""
    cosine = {"epochs": 6, "schedule": "cosine"}
    plain = make_run(tmp_path / "plain", seed=0, **cosine)
    boxed = make_run(tmp_path / "boxed", seed=1, stop_after_epochs=2, **cosine)
    limited = make_run(tmp_path / "limited", seed=2, time_limit=60.0, **cosine)
    stopped = make_run(tmp_path / "stopped", seed=3, trained=4, time_limit=1.0, **cosine)
    straight = make_run(tmp_path / "c5", seed=0, epochs=5, schedule="constant")
    extended = make_run(tmp_path / "c3to5", seed=1, epochs=3, trained=5, schedule="constant")
    runs = [plain, boxed, limited, stopped, straight, extended]
    groups = compare.group_runs(compare.load_runs(runs))
    assert [[run.path for run in g.runs] for g in groups] == [
        [plain, boxed, limited],
        [stopped],
        [straight, extended],
    ]


def test_eval_only_folders_form_their_own_groups(tmp_path, capsys):
    trained = [make_run(tmp_path / f"seed{s}", seed=s, headline=0.9 + s / 100) for s in (0, 1)]
    evaluated = [
        make_run(
            run / "eval-1",
            seed=s,
            headline=0.8,
            trained=0,
            eval_only=str(run / "checkpoints" / "best.pt"),
            eval_batch_size=64,
        )
        for s, run in enumerate(trained)
    ]
    out = tmp_path / "out"
    assert run_cli([*map(str, trained + evaluated), "--output-dir", str(out)]) == 0
    groups = json.loads((out / "compare.json").read_text())["groups"]
    assert [(g["label"], g["seeds"]) for g in groups] == [
        ("sigmoid_cnn", [0, 1]),
        ("eval-only sigmoid_cnn", [0, 1]),
    ]
    assert [g["eval_only"] for g in groups] == [False, True]
    assert groups[1]["metrics"]["test_accuracy"]["values"] == [0.8, 0.8]
    assert groups[1]["metrics"]["epochs"]["n"] == 0
    assert "eval-only sigmoid_cnn" in capsys.readouterr().out


def test_part2_compute_per_group_and_run(tmp_path, capsys):
    flops = [(120.0, 4.0), (130.0, 5.0)]
    runs = [
        make_run(
            tmp_path / f"seed{s}",
            task="segmentation",
            seed=s,
            model="unet",
            results_extra={"train_tflop": train, "val_tflop": val},
        )
        for s, (train, val) in enumerate(flops)
    ]
    older = make_run(tmp_path / "older", task="segmentation", model="unet", lr=0.1)  # no TFLOP
    out = tmp_path / "out"
    assert run_cli([*map(str, runs), str(older), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    new, old = summary["groups"]
    assert new["metrics"]["train_tflop"]["mean"] == pytest.approx(125.0)
    assert new["metrics"]["train_tflop"]["std"] == pytest.approx(np.std([120, 130], ddof=1))
    assert new["metrics"]["val_tflop"]["values"] == [4.0, 5.0]
    assert old["metrics"]["train_tflop"] == {"mean": None, "std": None, "n": 0, "values": [None]}
    by_name = {r["name"]: r for r in summary["runs"]}
    assert by_name["seed1"]["metrics"]["val_tflop"] == 5.0
    assert by_name["older"]["metrics"]["train_tflop"] is None
    page = (out / "compare.html").read_text()
    assert "train TFLOP" in page and "125.00 ± 7.07" in page
    assert "train_tflop" in capsys.readouterr().out


def test_a_switch_left_off_groups_with_folders_that_predate_it(tmp_path):
    older = make_run(tmp_path / "a", seed=0)  # no "tta" in args.json
    off = make_run(tmp_path / "b", seed=1, tta=False)
    on = make_run(tmp_path / "c", seed=2, tta=True)
    groups = compare.group_runs(compare.load_runs([older, off, on]))
    assert [len(g.runs) for g in groups] == [2, 1]
    assert [g.label for g in groups] == ["tta=-", "tta=True"]


def test_long_labels_are_cut_and_stay_unique(tmp_path):
    recipes = [
        {
            "model": "m",
            "optimizer": f"opt{i}",
            "schedule": f"s{i}",
            "loss": f"l{i}",
            "augment": "a",
            "weight_decay": 0.1 * i,
            "warmup_epochs": i,
        }
        for i in range(2)
    ]
    runs = [make_run(tmp_path / f"r{i}", **r) for i, r in enumerate(recipes)]
    labels = [g.label for g in compare.group_runs(compare.load_runs(runs))]
    assert len(set(labels)) == 2
    assert all(len(label) <= compare.MAX_LABEL_CHARS and "more" in label for label in labels)


def test_read_curves_keeps_last_row_of_a_repeated_epoch_and_skips_missing(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,train_loss,val_accuracy\n1,1.0,\n2,0.9,\n2,0.5,\n3,0.4,\n")
    curves = compare.read_curves(path)
    assert curves["epoch"].tolist() == [1, 2, 3]
    assert curves["train_loss"].tolist() == [1.0, 0.5, 0.4]
    assert "val_accuracy" not in curves and "val_loss" not in curves
    assert compare.read_curves(tmp_path / "absent.csv") == {}


# ----------------------------------------------------------------------------- errors
def test_mixed_parts_are_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    p1 = make_run(tmp_path / "p1")
    p2 = make_run(tmp_path / "p2", task="segmentation", model="unet")
    monkeypatch.chdir(tmp_path)
    assert run_cli([str(p1), str(p2), "--output-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, mentions="Part 1 and Part 2")
    assert run_cli([str(p1), str(p2)]) == 2
    assert_one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


def test_a_seed_twice_in_a_group_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    first = make_run(tmp_path / "a" / "seed0", seed=0)
    other = make_run(tmp_path / "a" / "seed1", seed=1)
    again = make_run(tmp_path / "b" / "seed0", seed=0, device="cuda")  # the same run again
    monkeypatch.chdir(tmp_path)
    argv = [str(first), str(other), str(again)]
    assert run_cli([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    line = assert_one_line_error(capsys, mentions="seed 0")
    assert str(first) in line and str(again) in line and str(other) not in line
    assert run_cli(argv) == 2
    assert_one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


def test_unfinished_run_is_refused(tmp_path, capsys):
    done = make_run(tmp_path / "done")
    running = make_run(tmp_path / "running", seed=1, finished=False)
    assert run_cli([str(done), str(running), "--output-dir", str(tmp_path / "out")]) == 2
    assert "unfinished" in assert_one_line_error(capsys, mentions=str(running))
    assert not (tmp_path / "out").exists()


def test_missing_folder_is_refused(tmp_path, capsys):
    done = make_run(tmp_path / "done")
    assert (
        run_cli([str(done), str(tmp_path / "absent"), "--output-dir", str(tmp_path / "out")]) == 2
    )
    assert_one_line_error(capsys, mentions=str(tmp_path / "absent"))
    assert not (tmp_path / "out").exists()


def test_no_folders_is_an_argparse_error(capsys):
    assert run_cli([]) == 2
    assert "error:" in capsys.readouterr().err


def test_output_dir_holding_a_report_is_refused(tmp_path, capsys):
    done = make_run(tmp_path / "done")
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.html").write_text("old report")
    assert run_cli([str(done), "--output-dir", str(out)]) == 2
    assert_one_line_error(capsys, mentions="compare.html")
    assert (out / "compare.html").read_text() == "old report"
    assert sorted(p.name for p in out.iterdir()) == ["compare.html"]


def test_same_folder_twice_and_bad_json_are_refused(tmp_path, capsys):
    done = make_run(tmp_path / "done")
    assert run_cli([str(done), str(done)]) == 2
    assert_one_line_error(capsys, mentions="twice")
    broken = make_run(tmp_path / "broken")
    (broken / "results.json").write_text("{not json")
    assert run_cli([str(broken), "--output-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, mentions="results.json")
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag(capsys):
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--output-dir" in text and "RUN" in text and "seed" in text


def test_a_later_flag_at_its_old_behaviour_groups_with_folders_that_predate_it(tmp_path):
    """--val-every 1 (validate every epoch) trains as folders written before the flag did;
    --val-every 5 selects among fewer epochs: another recipe."""
    older = make_run(tmp_path / "a", seed=0)  # no "val_every" in args.json
    every = make_run(tmp_path / "b", seed=1, val_every=1)
    sparse = make_run(tmp_path / "c", seed=2, val_every=5)
    groups = compare.group_runs(compare.load_runs([older, every, sparse]))
    assert sorted(len(g.runs) for g in groups) == [1, 2]


@pytest.mark.parametrize("flag, old_value, new_value", [
    ("split", "ranges", "grouped"), ("ema", 0.0, 0.5), ("rare_crops", 0.0, 0.5),
    ("tta_scales", [1.0], [1.0, 1.25]), ("eval_on", "test", "val"),
])  # fmt: skip
def test_later_part2_levers_left_off_group_with_older_folders(tmp_path, flag, old_value, new_value):
    older = make_run(tmp_path / "a", task="segmentation", model="unet", seed=0)
    off = make_run(tmp_path / "b", task="segmentation", model="unet", seed=1, **{flag: old_value})
    on = make_run(tmp_path / "c", task="segmentation", model="unet", seed=2, **{flag: new_value})
    groups = compare.group_runs(compare.load_runs([older, off, on]))
    assert sorted(len(g.runs) for g in groups) == [1, 2]


def test_the_frontier_plots_each_groups_mean_and_std_against_its_compute(tmp_path):
    points = {  # lr -> (test mean AP, train TFLOP, val TFLOP) per seed
        0.1: [(0.70, 90.0, 5.0), (0.74, 90.0, 5.0)],
        0.2: [(0.80, 500.0, 60.0)],
    }
    runs = [
        make_run(tmp_path / f"lr{lr}_s{s}", task="segmentation", model="unet", lr=lr, seed=s,
                 results_extra={"mean_ap": ap, "train_tflop": t, "val_tflop": v})
        for lr, seeds in points.items() for s, (ap, t, v) in enumerate(seeds)
    ]  # fmt: skip
    older = make_run(tmp_path / "older", task="segmentation", model="unet", lr=0.3)  # no TFLOP
    out = tmp_path / "out"
    summary = compare.compare_runs([*runs, older], out)
    assert summary["figures"]["frontier"] == "frontier.png" and (out / "frontier.png").is_file()
    got = compare_report.frontier_points(summary, compare.TASKS["segmentation"])
    assert [(t, m, s, n) for _, t, m, s, n in got] == [
        (95.0, pytest.approx(0.72), pytest.approx(np.std([0.70, 0.74], ddof=1)), 2),
        (560.0, pytest.approx(0.80), 0, 1),
    ]
    assert [label for label, *_ in got] == ["lr=0.1", "lr=0.2"]  # no lr shared: each names it
    assert "Compute against result" in (out / "compare.html").read_text()
    part1 = make_run(tmp_path / "p1", seed=0)
    assert "frontier" not in compare.compare_runs([part1], tmp_path / "out1")["figures"]


def test_frontier_labels_name_what_sets_a_group_apart_from_the_most_common_recipe():
    recipes = [(0.1, 0.9), (0.1, None), (0.2, 0.9), (0.1, 0.9)]
    groups = [{"differs": {"lr": lr, "ema": ema}} for lr, ema in recipes]
    assert compare_report.contrast_labels(groups) == [
        "the recipe most groups share",
        "ema=-",
        "lr=0.2",
        "the recipe most groups share",
    ]
