"""Stacks benchmark: many heads as one program against the plain Keras loop and against --no-stack.

Three figures, each a whole fresh process (TensorFlow import, data load, baseline and every
artifact included), with its peak RSS:
- the 16-head digits sweep (hidden [128] or [256, 64], dropout 0/0.2, lr 1e-3/3e-3, two seeds;
  batch 64, up to 60 epochs, patience 6) as `pipeline train --sweep`, beside the plain loop a
  user writes (one keras.Sequential + fit + EarlyStopping per config, one process);
- 16 heads x 4 epochs on 50,000 x 256 synthetic rows (hidden [512, 128] and [256]), stacked and
  --no-stack;
- 64 heads on the digits, stacked.
The digits are scikit-learn's, at 32 px through two ResNet50 taps with random weights, reduced to
64 components, as the issue that asked for stacks measured them.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIGITS_TAPS = ("resnet50:conv4_block6_out", "resnet50:conv5_block3_out")
DIGITS_GRID = {"hidden": [[128], [256, 64]], "dropout": [0.0, 0.2], "lr": [0.001, 0.003]}
DIGITS_BASE = {"batch_size": 64, "epochs": 60, "patience": 6}
LARGE_GRID = {"hidden": [[512, 128], [256]], "dropout": [0.0, 0.3]}


def digits_reduced(work):
    """The digits at 32 px -> two ResNet50 taps (random weights) -> 64 PCA components; the reduced dir."""
    pipeline = [sys.executable, "-m", "pipeline"]
    work = Path(work)
    reduced = work / "digits-reduced"
    if not reduced.exists():
        subprocess.run([*pipeline, "demo-data", work / "digits", "--size", "32"], check=True, capture_output=True)
        taps = [arg for tap in DIGITS_TAPS for arg in ("--tap", tap)]
        subprocess.run(
            [
                *pipeline,
                "extract",
                work / "digits",
                "--out",
                work / "digits-features",
                "--weights",
                "random",
                "--image-size",
                "32",
                *taps,
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*pipeline, "reduce", work / "digits-features", "--out", reduced, "--components", "64"],
            check=True,
            capture_output=True,
        )
    return reduced


def sweep_toml(path, base, grid, seeds):
    lines = ["[base]", *(f"{key} = {json.dumps(value)}" for key, value in base.items()), "", "[grid]"]
    lines += [f"{key} = {json.dumps(values)}" for key, values in {**grid, "seed": list(range(seeds))}.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def measure_train(reduced, runs, sweep, *flags):
    """Whole `pipeline train REDUCED --sweep SWEEP` process: seconds, peak RSS, heads' mean val accuracy and their run seconds."""
    seconds, rss = _rss_run(
        [sys.executable, "-m", "pipeline", "train", str(reduced), "--runs", str(runs), "--sweep", str(sweep), *flags]
    )
    metrics = [json.loads(path.read_text()) for path in sorted(Path(runs).glob("h*/metrics.json"))]
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": rss,
        "heads": len(metrics),
        "mean_val_accuracy": round(float(np.mean([m["val"]["accuracy"] for m in metrics])), 4),
        "epochs": int(sum(m["epochs"] for m in metrics)),
    }


def measure_plain_loop(reduced, configs):
    """The loop a user writes, in a fresh process: one keras.Sequential + fit + EarlyStopping per config."""
    seconds, rss = _rss_run([sys.executable, "-m", "pipeline.bench.stacks", "plain-loop", str(reduced), json.dumps(configs)])
    result = json.loads(Path(reduced, "plain-loop.json").read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mb": rss, **result}


def _rss_run(argv):
    """(seconds, peak RSS MB) of a fresh process running `argv`."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr.decode(errors='replace')[-2000:]}")
    return seconds, round(usage.ru_maxrss / 1024, 1)


def _plain_loop(reduced, configs):
    """Run in the child: each config as a user would, without the pipeline; writes plain-loop.json beside the data."""
    import keras

    from pipeline.reduced import load_reduced

    data = load_reduced(reduced)
    train, val = data.splits == "train", data.splits == "val"
    classes = len(data.classes)
    y_train, y_val = (
        keras.utils.to_categorical(data.labels[train], classes),
        keras.utils.to_categorical(data.labels[val], classes),
    )
    accuracies, epochs = [], 0
    for config in configs:
        keras.utils.set_random_seed(config["seed"])
        layers = [keras.Input((data.X.shape[1],))]
        for units in config["hidden"]:
            layers.append(keras.layers.Dense(units, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4)))
            if config["dropout"]:
                layers.append(keras.layers.Dropout(config["dropout"]))
        layers.append(keras.layers.Dense(classes, activation="softmax"))
        model = keras.Sequential(layers)
        model.compile(keras.optimizers.Adam(config["lr"]), "categorical_crossentropy", metrics=["accuracy"])
        stopper = keras.callbacks.EarlyStopping(patience=config["patience"], restore_best_weights=True)
        history = model.fit(
            data.X[train],
            y_train,
            batch_size=config["batch_size"],
            epochs=config["epochs"],
            validation_data=(data.X[val], y_val),
            callbacks=[stopper],
            verbose=0,
        )
        epochs += len(history.history["loss"])
        accuracies.append(float(np.mean(model.predict(data.X[val], verbose=0).argmax(1) == data.labels[val])))
    Path(reduced, "plain-loop.json").write_text(
        json.dumps({"heads": len(configs), "mean_val_accuracy": round(float(np.mean(accuracies)), 4), "epochs": epochs})
    )


def grid_configs(base, grid, seeds):
    import itertools

    keys = [*grid, "seed"]
    return [{**base, **dict(zip(keys, values))} for values in itertools.product(*grid.values(), range(seeds))]


def measure_stacks(work, log=print, large_reduced=None):
    """Every figure of this stage; `large_reduced` is a 50,000 x 256 reduced dir (None: skip that figure)."""
    work = Path(work)
    results = {}
    log("stacks: digits reduced set (extract at 32 px, 64 components)")
    digits = digits_reduced(work)
    sweep16 = sweep_toml(work / "digits16.toml", DIGITS_BASE, DIGITS_GRID, 2)
    log("stacks: 16-head digits sweep, pipeline train --sweep (stacked)")
    stacked = measure_train(digits, work / "runs-digits16", sweep16)
    log("stacks: 16-head digits sweep, the plain Keras loop")
    plain = measure_plain_loop(digits, grid_configs(DIGITS_BASE, DIGITS_GRID, 2))
    results["digits_sweep_16"] = {
        "pipeline_train": stacked,
        "plain_keras_loop": plain,
        "speedup": round(plain["seconds"] / stacked["seconds"], 2),
    }
    log("stacks: 64 heads on the digits")
    results["digits_64"] = measure_train(
        digits, work / "runs-digits64", sweep_toml(work / "digits64.toml", DIGITS_BASE, DIGITS_GRID, 8)
    )
    if large_reduced is not None:
        sweep = sweep_toml(work / "large.toml", {"epochs": 4, "patience": 4}, LARGE_GRID, 4)
        log("stacks: 16 heads x 4 epochs on 50,000 x 256, stacked")
        on = measure_train(large_reduced, work / "runs-large-stack", sweep)
        log("stacks: 16 heads x 4 epochs on 50,000 x 256, --no-stack")
        off = measure_train(large_reduced, work / "runs-large-solo", sweep, "--no-stack")
        results["large_16x4"] = {"stack": on, "no_stack": off, "speedup": round(off["seconds"] / on["seconds"], 2)}
    return results


def large_reduced(work):
    """A 50,000-row reduced set of 256 components from synthetic float16 features (2 x 256 dims)."""
    from pipeline.bench.stage_two import write_synthetic_features

    work = Path(work)
    reduced = work / "large-reduced"
    if not reduced.exists():
        features = write_synthetic_features(
            work / "large-features", 50_000, 25_000, {"resnet50/conv4_block6_out": 384, "vgg16/block5_conv3": 384}
        )
        subprocess.run(
            [sys.executable, "-m", "pipeline", "reduce", features, "--out", reduced, "--components", "256"],
            check=True,
            capture_output=True,
        )
    return reduced


if __name__ == "__main__":
    if sys.argv[1] == "plain-loop":
        _plain_loop(sys.argv[2], json.loads(sys.argv[3]))
    else:  # python -m pipeline.bench.stacks WORK_DIR [--large]: every figure, as JSON
        work = Path(sys.argv[1])
        work.mkdir(parents=True, exist_ok=True)
        large = large_reduced(work) if "--large" in sys.argv else None
        print(json.dumps(measure_stacks(work, log=lambda line: print(line, file=sys.stderr), large_reduced=large), indent=2))
