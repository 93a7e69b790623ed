"""The benchmark report: run statistics, derived ratios, the issue's targets, and bench.md."""

import math
import statistics

from pipeline.errors import PipelineError

# The targets.
E2E_OVER_MODEL = 0.90
RAY_OVER_LOCAL = 0.90  # the ray engine's images/s over the local engine's on the same machine
E2E_OVER_BASELINE = 2.0
MODEL_OVER_FLOP_BOUND = 0.80
MIN_COSINE = 0.99
REDUCE_RSS_MB = 1536
REDUCE_ROW_COST_GROWTH = 1.25  # seconds per row at the largest size / at the smallest: at most this (linear)
UP_TO_DATE_SECONDS = 5.0  # a whole `pipeline extract` rerun over a finished directory
UPDATE_ADD_SHARE = 0.05  # a rerun after adding 1% of the images, less start-up, over the full run's whole time (issue 14)
UPDATE_REMOVE_SECONDS = 2.0  # a whole rerun after 1% of the images were removed (issue 14)
UPDATE_NO_CHANGE_SECONDS = 0.5  # a rerun with no change, in process (issue 14)
NOT_APPLICABLE = "not applicable"  # a target's `met` where the machine lacks what it measures
SWEEP_SPEEDUP = 1.6  # a sweep with --jobs 2 against --jobs 1, on 2 cores: at least this
LOAD_OVER_FILE_READ = 0.5  # load_features' rate over a plain sequential read of the same files: at least this
LOAD_RSS_OVER_ARRAYS = 1.1  # load_features' peak RSS over the arrays it returns (the interpreter and h5py aside): at most this


def summarize(values):
    """{min, median, max, runs} of a list of measurements (each rounded to 4 significant digits)."""
    values = [float(v) for v in values]
    return {
        "min": _round(min(values)),
        "median": _round(statistics.median(values)),
        "max": _round(max(values)),
        "runs": [_round(v) for v in values],
    }


def _round(value):
    return float(f"{value:.4g}")


def ratio(numerator, denominator):
    """numerator / denominator of two summaries' medians (or plain numbers), rounded; None if either is missing."""
    if numerator is None or denominator is None:
        return None
    numerator, denominator = (v["median"] if isinstance(v, dict) else v for v in (numerator, denominator))
    return _round(numerator / denominator) if denominator else None


def derived(results, policy):
    """Ratios of medians and single figures the report quotes, by name; a skipped stage's are left out.

    `policy` is the precision `auto` resolved to.
    """
    model, extract = results.get("model", {}), results.get("extract", {})
    flops = results.get("flops", {}).get("policies", {})
    baseline = results.get("baseline", {})
    figures = {}
    for p in dict.fromkeys([*model, *extract]):
        run = extract.get(p, {})
        rate = model.get(p, {}).get("images_per_second")
        figures[f"end to end / model bound, steady state ({p})"] = ratio(run.get("steady_images_per_second"), rate)
        figures[f"end to end / model bound, start to manifest ({p})"] = ratio(run.get("images_per_second"), rate)
        model_cost = (1 / rate["median"], 0.0) if rate else None
        figures[f"images for start to manifest >= {E2E_OVER_MODEL} x model bound ({p})"] = _images_to_reach(
            E2E_OVER_MODEL, _cost(run), model_cost
        )
        figures[f"end to end ({p}) / seed-style baseline, start to end"] = ratio(
            run.get("images_per_second"), baseline.get("images_per_second")
        )
        figures[f"end to end ({p}) / seed-style baseline, steady state"] = ratio(
            run.get("steady_images_per_second"), baseline.get("steady_images_per_second")
        )
        figures[f"images for start to end >= {E2E_OVER_BASELINE} x seed-style baseline ({p})"] = _images_to_reach(
            E2E_OVER_BASELINE, _cost(run), _cost(baseline)
        )
        figures[f"model bound / FLOP bound ({p})"] = flops.get(p, {}).get("fraction_of_bound")
        figures[f"min cosine vs float32 ({p})"] = run.get("min_cosine_vs_float32")
    for p, engines in results.get("ray", {}).items():
        run, local = engines["ray"], engines["local"]
        figures[f"ray engine / local engine, steady state ({p})"] = ratio(
            run.get("steady_images_per_second"), local.get("steady_images_per_second")
        )
        figures[f"ray engine / local engine, start to manifest ({p})"] = ratio(
            run.get("images_per_second"), local.get("images_per_second")
        )
        figures[f"images for ray start to manifest >= {RAY_OVER_LOCAL} x local ({p})"] = _images_to_reach(
            RAY_OVER_LOCAL, _cost(run), _cost(local)
        )
    if policy != "float32":
        for stage in ("model", "extract"):
            figures[f"{policy} / float32, {stage}"] = ratio(
                results.get(stage, {}).get(policy, {}).get("images_per_second"),
                results.get(stage, {}).get("float32", {}).get("images_per_second"),
            )
    figures[f"decode bound / model bound ({policy})"] = ratio(
        results.get("decode", {}).get("images_per_second"), model.get(policy, {}).get("images_per_second")
    )
    fast = results.get("fast_decode", {})
    figures["--fast-decode speed-up on large JPEGs (decode bound)"] = fast.get("speedup")
    figures["--fast-decode min cosine vs full decode"] = fast.get("min_cosine_vs_full_decode")
    figures["--fast-decode mean cosine vs full decode"] = fast.get("mean_cosine_vs_full_decode")
    startup = results.get("startup")
    if startup:
        for p, phases in startup["first_batch"].items():
            figures[f"start-up: command start to first batch (s, {p})"] = phases["first_batch"]["median"]
            figures[f"start-up: command start to model ready (s, {p})"] = phases["model_ready"]["median"]
        figures["start-up: up-to-date extract rerun, whole command (s)"] = startup["up_to_date_seconds"]["median"]
        figures["start-up: predict on one image, whole command (s)"] = startup["predict_one_seconds"]["median"]
        for flag, seconds in startup.get("four_images_seconds", {}).items():
            figures[f"start-up: extract of 4 images {flag}, whole command (s)"] = seconds["median"]
    update = results.get("update")
    if update:
        figures["update: rerun after adding 1% / full run, whole command"] = ratio(
            update["add_seconds"]["median"], update["full_seconds"]["median"]
        )
        figures["update: (rerun after adding 1% - start-up) / full run"] = ratio(
            update["add_seconds"]["median"] - update["start_up_seconds"]["median"], update["full_seconds"]["median"]
        )
        figures["update: rerun after removing 1%, whole command (s)"] = update["remove_seconds"]["median"]
        figures["update: rerun with no change, whole command (s)"] = update["no_change_seconds"]["median"]
        figures["update: rerun with no change, in process (s)"] = update["no_change_in_process_seconds"]["median"]
        figures["update: sha256 per image (ms)"] = update["sha256_ms_per_image"]
    reduce = results.get("reduce")
    if reduce:
        figures["reduce peak RSS at the largest size (MB)"] = reduce["sizes"][-1]["peak_rss_mb"]["median"]
        figures["reduce seconds per row, largest / smallest size"] = reduce["row_cost_growth"]
        load = reduce.get("load_features")
        if load:
            figures["load_features rate / sequential read of its files"] = ratio(
                load["gb_per_second"], load["file_gb_per_second"]
            )
            figures["load_features peak RSS / its arrays"] = ratio(load["peak_rss_mb"], load["arrays_mb"])
    sweep = results.get("sweep")
    if sweep:
        reference, *others = sweep["jobs"]
        for jobs in others:
            figures[sweep_figure(reference, jobs)] = ratio(sweep["jobs"][reference]["seconds"], sweep["jobs"][jobs]["seconds"])
    return {name: value for name, value in figures.items() if value is not None}


def sweep_figure(reference, jobs):
    """The derived figure's name: how many times faster the sweep is with --jobs `jobs` than with `reference`."""
    return f"sweep speed-up, --jobs {jobs} over --jobs {reference}"


def _cost(run):
    """(seconds per image, fixed seconds) of a timed run's medians: seconds = images * per_image + fixed.

    The steady rate after the first batch gives the per-image cost; the rest of the start-to-end
    time is fixed (start-up, first trace, fidelity check, last write). None without a steady rate.
    """
    if not run or not run.get("steady_images_per_second"):
        return None
    per_image = 1 / run["steady_images_per_second"]["median"]
    return per_image, run["images"] / run["images_per_second"]["median"] - run["images"] * per_image


def _images_to_reach(goal, ours, theirs):
    """The smallest corpus on which theirs' seconds / ours' seconds >= goal; None if no size does.

    `ours` and `theirs` are (seconds per image, fixed seconds), as `_cost` gives them.
    """
    if ours is None or theirs is None:
        return None
    gain_per_image = theirs[0] - goal * ours[0]
    needed = goal * ours[1] - theirs[1]
    if needed <= 0:
        return 1
    return math.ceil(round(needed / gain_per_image, 6)) if gain_per_image > 0 else None  # round: float noise


def targets(figures, policies):
    """The issues' targets checked against `derived` figures: [{target, measured, required, met}].

    `policies` are the precisions measured, `auto`'s first. A target whose stage was skipped has
    `measured` and `met` None; one that needs reduced-precision hardware, on a machine where
    `auto` found none (it picked float32), has `met` "not applicable".
    """
    policy = policies[0]
    checks = [
        (f"end to end / model bound, steady state ({policy})", ">=", E2E_OVER_MODEL, False),
        (f"end to end / model bound, start to manifest ({policy})", ">=", E2E_OVER_MODEL, False),
        (f"end to end ({policy}) / seed-style baseline, steady state", ">=", E2E_OVER_BASELINE, False),
        (f"end to end ({policy}) / seed-style baseline, start to end", ">=", E2E_OVER_BASELINE, False),
        *((f"model bound / FLOP bound ({p})", ">=", MODEL_OVER_FLOP_BOUND, False) for p in policies),
        (f"min cosine vs float32 ({policy})", ">=", MIN_COSINE, True),
        (f"ray engine / local engine, steady state ({policy})", ">=", RAY_OVER_LOCAL, False),
        (f"ray engine / local engine, start to manifest ({policy})", ">=", RAY_OVER_LOCAL, False),
        ("start-up: up-to-date extract rerun, whole command (s)", "<", UP_TO_DATE_SECONDS, False),
        ("update: (rerun after adding 1% - start-up) / full run", "<=", UPDATE_ADD_SHARE, False),
        ("update: rerun after removing 1%, whole command (s)", "<", UPDATE_REMOVE_SECONDS, False),
        ("update: rerun with no change, whole command (s)", "<", UP_TO_DATE_SECONDS, False),
        ("update: rerun with no change, in process (s)", "<", UPDATE_NO_CHANGE_SECONDS, False),
        ("reduce peak RSS at the largest size (MB)", "<", REDUCE_RSS_MB, False),
        ("reduce seconds per row, largest / smallest size", "<=", REDUCE_ROW_COST_GROWTH, False),
        (sweep_figure("1", "2"), ">=", SWEEP_SPEEDUP, False),
        ("load_features rate / sequential read of its files", ">=", LOAD_OVER_FILE_READ, False),
        ("load_features peak RSS / its arrays", "<=", LOAD_RSS_OVER_ARRAYS, False),
    ]
    compare = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
    rows = []
    for name, relation, threshold, needs_reduced_precision in checks:
        if needs_reduced_precision and policy == "float32":
            met = NOT_APPLICABLE
        else:
            met = None if name not in figures else bool(compare[relation](figures[name], threshold))
        rows.append({"target": name, "measured": figures.get(name), "required": f"{relation} {threshold}", "met": met})
    return rows


def render_markdown(report):
    """bench.md: the machine, the settings, one row per measurement, the ratios and the targets."""
    machine, settings, results = report["machine"], report["settings"], report["results"]
    load = report["load_average"]
    lines = [
        f"# pipeline bench: {settings['image_size']} px, {settings['images']} images, batch {settings['batch_size']}; "
        f"{settings['repeats']} timed runs after a warm-up (reduce: {settings['reduce_repeats']} cold run per size; "
        f"sweep: {settings.get('sweep_repeats', 1)} cold run per --jobs)",
        "",
        f"Machine: {machine['cpu']} ({machine['cores']} cores), {machine['accelerator']}; "
        f"CPU flags: {', '.join(machine.get('cpu_flags', [])) or 'none of note'}. "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}. Corpus: {settings['corpus']}. "
        f"Load average (1 min) {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end; "
        f"total {report['seconds']:.0f} s.",
        "",
        "| measurement | precision | min | median | max | unit |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    lines += [_row(*row) for row in _measurement_rows(results)]
    lines += ["", "| derived figure | value |", "| --- | ---: |"]
    lines += [f"| {name} | {_number(value, 5)} |" for name, value in report["derived"].items()]
    lines += ["", "| target | measured | required | met |", "| --- | ---: | --- | --- |"]
    for target in report["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured", NOT_APPLICABLE: "not applicable: no bf16/fp16 hardware"}[
            target["met"]
        ]
        lines.append(f"| {target['target']} | {_number(target['measured'], 5)} | {target['required']} | {met} |")
    return "\n".join(lines) + "\n"


def _measurement_rows(results):
    """(measurement, precision, stats, unit) for every measured stage, in the issue's order."""
    rows = []
    for policy, stats in results.get("model", {}).items():
        rows.append(("model bound: fused tap forward on in-memory batches", policy, stats["images_per_second"], "images/s"))
    for policy, stats in results.get("extract", {}).items():
        rows += _run_rows("end to end: `extract`", "manifest", policy, stats)
    for policy, engines in results.get("ray", {}).items():
        for engine, stats in engines.items():
            rows += _run_rows(f"engines, alternating runs: `extract --engine {engine}`", "manifest", policy, stats)
    if "decode" in results:
        rows.append(
            ("decode bound: tf.data read, decode, resize, batch", "-", results["decode"]["images_per_second"], "images/s")
        )
    if "baseline" in results:
        rows += _run_rows("seed-style baseline", "HDF5 written", "float32", results["baseline"])
    flops = results.get("flops")
    for policy, stats in (flops or {}).get("policies", {}).items():
        per_image = f"{flops['gflop_per_image']:.4g} GFLOP per image"
        rows.append((f"matmul {stats['matmul_size']}x{stats['matmul_size']}", policy, stats["matmul_gflops"], "GFLOP/s"))
        rows.append((f"FLOP bound: matmul rate / {per_image}", policy, stats["bound_images_per_second"], "images/s"))
        rows.append((f"achieved: model bound x {per_image}", policy, stats["achieved_gflops"], "GFLOP/s"))
    fast = results.get("fast_decode")
    if fast:
        size = "x".join(map(str, fast["photo_size"]))
        rows.append((f"decode bound, {size} JPEGs, full decode", "-", fast["full_images_per_second"], "images/s"))
        rows.append((f"decode bound, {size} JPEGs, --fast-decode", "-", fast["fast_images_per_second"], "images/s"))
    reduce = results.get("reduce")
    if reduce:
        for size in reduce["sizes"]:
            what = f"reduce {size['rows']:,} x {reduce['dims']:,} float16, {reduce['solver']}"
            rows.append((what, "-", size["seconds"], "s"))
            rows.append((f"{what}: peak RSS", "-", size["peak_rss_mb"], "MB"))
        load = reduce.get("load_features")
        if load:
            what = f"load_features {load['rows']:,} x {reduce['dims']:,} float16, every tap in memory"
            rows.append((what, "-", summarize([load["gb_per_second"]]), "GB/s"))
            rows.append(
                (f"{what}: plain sequential read of the same files", "-", summarize([load["file_gb_per_second"]]), "GB/s")
            )
            rows.append(
                (f"{what}: peak RSS ({load['arrays_mb']:,.0f} MB of arrays)", "-", summarize([load["peak_rss_mb"]]), "MB")
            )
    startup = results.get("startup")
    if startup:
        for policy, phases in startup["first_batch"].items():
            for phase, label in _STARTUP_PHASES.items():
                rows.append((f"start-up, fresh process: command start to {label}", policy, phases[phase], "s"))
        rows.append(("start-up: `pipeline extract` rerun over a finished directory", "-", startup["up_to_date_seconds"], "s"))
        rows.append(("start-up: `pipeline predict` on one image, whole command", "float32", startup["predict_one_seconds"], "s"))
        for flag, seconds in startup.get("four_images_seconds", {}).items():
            rows.append((f"start-up: `pipeline extract` of 4 images {flag}, whole command", "float32", seconds, "s"))
    update = results.get("update")
    if update:
        n = update["images"]
        rows.append((f"update: first `pipeline extract` over {n} images, whole command", "-", update["full_seconds"], "s"))
        rows.append((f"update: rerun after adding {update['added']} images (1%)", "-", update["add_seconds"], "s"))
        rows.append((f"update: rerun after removing {update['removed']} images (1%)", "-", update["remove_seconds"], "s"))
        rows.append(("update: start-up, a first run over one image, whole command", "-", update["start_up_seconds"], "s"))
        rows.append(("update: rerun with no change, whole command", "-", update["no_change_seconds"], "s"))
        rows.append(
            (
                "update: rerun with no change, in process (listing, planning, checks)",
                "-",
                update["no_change_in_process_seconds"],
                "s",
            )
        )
        sha = summarize([update["sha256_ms_per_image"]])
        rows.append((f"update: sha256 of one image ({update['mean_image_kb']} KB mean, page cache)", "-", sha, "ms"))
    heads = results.get("heads")
    if heads:
        what = f"head experiment, {heads['rows']:,} x {heads['dims']} reduced, hidden {heads['hidden']}"
        rows.append((what, "float32", heads["seconds"], "s"))
        rows.append((f"{what}: epochs run (early stopping)", "float32", heads["epochs"], "epochs"))
        rows.append((f"{what}: per epoch", "float32", heads["seconds_per_epoch"], "s"))
    sweep = results.get("sweep")
    if sweep:
        what = f"sweep of {sweep['heads']} heads x {sweep['epochs']} epochs, {sweep['rows']:,} x {sweep['dims']} reduced, `pipeline train`"
        for jobs, stats in sweep["jobs"].items():
            rows.append((f"{what} --jobs {jobs}", "float32", stats["seconds"], "s"))
            rows.append((f"{what} --jobs {jobs}: seconds summed over the runs", "float32", stats["run_seconds"], "s"))
    rows += _stack_rows(results.get("stacks"))
    return rows


def _stack_rows(stacks):
    """The stacks stage: one cold run of each whole command (see bench.stacks)."""
    if not stacks:
        return []
    once = lambda value: {"min": value, "median": value, "max": value}  # noqa: E731
    rows = []
    sweep = stacks["digits_sweep_16"]
    for name, run in (
        ("`pipeline train --sweep` (stacks)", sweep["pipeline_train"]),
        ("the plain Keras loop", sweep["plain_keras_loop"]),
    ):
        what = f"16-head digits sweep, {name}, whole process"
        rows += [
            (what, "float32", once(run["seconds"]), "s"),
            (f"{what}: mean val accuracy", "float32", once(run["mean_val_accuracy"]), ""),
        ]
    rows.append(("16-head digits sweep: plain loop / stacks", "float32", once(sweep["speedup"]), "x"))
    digits64 = stacks["digits_64"]
    rows += [
        ("64 heads on the digits, whole command", "float32", once(digits64["seconds"]), "s"),
        ("64 heads on the digits: peak RSS", "float32", once(digits64["peak_rss_mb"]), "MB"),
    ]
    large = stacks.get("large_16x4")
    if large:
        for mode in ("stack", "no_stack"):
            rows.append(
                (
                    f"16 heads x 4 epochs on 50,000 x 256, --{mode.replace('_', '-')}, whole command",
                    "float32",
                    once(large[mode]["seconds"]),
                    "s",
                )
            )
        rows.append(("16 heads x 4 epochs on 50,000 x 256: --no-stack / --stack", "float32", once(large["speedup"]), "x"))
    return rows


_STARTUP_PHASES = {
    "imports": "imports done (TensorFlow included)",
    "listing": "images listed",
    "model_ready": "model ready (built, weights loaded, traced)",
    "first_batch": "first batch computed",
    "end": "manifest written",
}


def _run_rows(name, end, policy, stats):
    """Rows of a timed run: start to end, steady state after the first batch, time to the first batch."""
    rows = [(f"{name}, start to {end}", policy, stats["images_per_second"], "images/s")]
    if stats["steady_images_per_second"] is not None:
        rows.append((f"{name}, steady state after the first batch", policy, stats["steady_images_per_second"], "images/s"))
    rows.append((f"{name}, start to first batch done", policy, stats["first_batch_seconds"], "s"))
    return rows


def _row(name, policy, stats, unit):
    return f"| {name} | {policy} | {_number(stats['min'])} | {_number(stats['median'])} | {_number(stats['max'])} | {unit} |"


def _number(value, digits=4):
    """A table cell: `digits` significant digits, thousands separated, '-' for a missing value."""
    if value is None:
        return "-"
    if abs(value) >= 10**digits or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


RESULTS_START = "<!-- bench-table:start -->"
RESULTS_END = "<!-- bench-table:end -->"


def replace_results_table(page, tables):
    """`page` (a results page in Markdown) with the text between its bench-table markers replaced by `tables`."""
    before, start, rest = page.partition(RESULTS_START)
    middle, end, after = rest.partition(RESULTS_END)
    if not start or not end:
        raise PipelineError(
            f"the results page has no {RESULTS_START} ... {RESULTS_END} block to replace; add both markers around its table"
        )
    return f"{before}{RESULTS_START}\n{tables.strip()}\n{RESULTS_END}{after}"
