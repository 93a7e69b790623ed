"""The benchmark code at tiny sizes: well-formed reports, right arithmetic. No timing is asserted."""

import itertools
import json
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import backbones, shards
from pipeline.bench import flops as bench_flops
from pipeline.bench import report as bench_report
from pipeline.bench import stage_two as bench_stage_two
from pipeline.bench.corpus import PHOTO_SIZE, write_corpus
from pipeline.bench.flops import count_flops, matmul_gflops
from pipeline.bench.runner import STAGES, BenchOptions, run_bench, seed_style_baseline
from pipeline.cli import cli
from pipeline.config import ReduceConfig
from pipeline.errors import PipelineError

TINY = dict(
    image_size=32,
    taps=("vgg16:block1_conv2",),
    images=4,
    batch_size=2,
    repeats=1,
    matmul_size=64,
    large_images=1,
    reduce_rows=(200, 400),
    shard_rows=200,
    tap_dims=(8, 8, 8, 8),
    components=4,
    head_epochs=1,
    sweep_heads=4,
    sweep_epochs=1,
)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One run of every stage but ray (tests/test_ray.py runs the engine) at tiny sizes; (report, out dir)."""
    out = tmp_path_factory.mktemp("bench")
    return run_bench(BenchOptions(out=out, skip=("ray", "stacks"), **TINY), log=lambda line: None), out


def test_report_holds_every_stage_for_every_precision(tiny_report):
    report, out = tiny_report
    results = report["results"]
    policies = list(dict.fromkeys([report["settings"]["precision_auto"], "float32"]))
    assert set(results) == {
        "model",
        "extract",
        "decode",
        "baseline",
        "flops",
        "fast_decode",
        "startup",
        "update",
        "reduce",
        "heads",
        "sweep",
    }
    for stage in ("model", "extract"):
        assert list(results[stage]) == policies
    assert list(results["flops"]["policies"]) == policies
    assert [size["rows"] for size in results["reduce"]["sizes"]] == [200, 400]
    assert results["reduce"]["dims"] == 32
    assert results["reduce"]["load_features"]["rows"] == 400 and "load_features peak RSS / its arrays" in report["derived"]
    assert results["heads"]["rows"] == 200 and results["heads"]["dims"] == 4
    assert list(results["sweep"]["jobs"]) == ["1", "2"] and results["sweep"]["heads"] == 4
    assert results["extract"][policies[0]]["images"] == 4
    update = results["update"]
    assert (update["images"], update["added"], update["removed"]) == (4, 1, 1) and update["sha256_ms_per_image"] > 0
    assert update["no_change_seconds"]["median"] > 0 and update["start_up_seconds"]["median"] > 0
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(report))
    assert not (out / "work").exists()


def test_report_statistics_are_ordered_and_ratios_use_medians(tiny_report):
    report, _ = tiny_report
    results, policy = report["results"], report["settings"]["precision_auto"]
    stats = results["model"][policy]["images_per_second"]
    assert stats["min"] <= stats["median"] <= stats["max"] and len(stats["runs"]) == TINY["repeats"]
    extract_rate = results["extract"][policy]["images_per_second"]["median"]
    expected = extract_rate / stats["median"]
    assert report["derived"][f"end to end / model bound, start to manifest ({policy})"] == pytest.approx(expected, rel=1e-3)
    flops = results["flops"]
    fraction = stats["median"] * flops["gflop_per_image"] / flops["policies"][policy]["matmul_gflops"]["median"]
    assert flops["policies"][policy]["fraction_of_bound"] == pytest.approx(fraction, rel=1e-3)
    assert 0.9 < results["fast_decode"]["min_cosine_vs_full_decode"] <= 1 + 1e-6


def test_markdown_tables_are_well_formed(tiny_report):
    report, out = tiny_report
    text = (out / "bench.md").read_text()
    assert report["machine"]["cpu"] in text
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert [table[0] for table in tables] == [
        "| measurement | precision | min | median | max | unit |",
        "| derived figure | value |",
        "| target | measured | required | met |",
    ]
    for table in tables:
        assert len({line.count("|") for line in table}) == 1, table
        assert len(table) > 2
    assert len(tables[2]) == 2 + len(report["targets"])


def test_skipped_stages_are_absent_and_their_targets_not_measured(tmp_path):
    skip = tuple(stage for stage in STAGES if stage != "decode")
    report = run_bench(BenchOptions(out=tmp_path, skip=skip, **TINY), log=lambda line: None)
    assert set(report["results"]) == {"decode"}
    assert all(target["measured"] is None for target in report["targets"])
    assert {target["met"] for target in report["targets"]} <= {None, bench_report.NOT_APPLICABLE}
    assert "not measured" in (tmp_path / "bench.md").read_text()


def test_start_up_phases_come_in_order_and_reruns_are_timed(tiny_report):
    report, out = tiny_report
    startup = report["results"]["startup"]
    for phases in startup["first_batch"].values():
        medians = [phases[phase]["median"] for phase in ("imports", "listing", "model_ready", "first_batch", "end")]
        assert medians == sorted(medians) and medians[0] > 0
    assert 0 < startup["up_to_date_seconds"]["median"] and 0 < startup["predict_one_seconds"]["median"]
    assert set(startup["four_images_seconds"]) == {"--xla", "--no-xla"} and all(
        s["median"] > 0 for s in startup["four_images_seconds"].values()
    )
    assert "command start to first batch computed" in (out / "bench.md").read_text()


def test_a_target_that_needs_reduced_precision_is_not_applicable_where_auto_picks_float32():
    figures = {"min cosine vs float32 (float32)": 1.0, "model bound / FLOP bound (float32)": 0.5}
    met = {t["target"]: t["met"] for t in bench_report.targets(figures, ["float32"])}
    assert met["min cosine vs float32 (float32)"] == bench_report.NOT_APPLICABLE
    assert met["model bound / FLOP bound (float32)"] is False
    figures = {"min cosine vs float32 (mixed_bfloat16)": 0.98}
    assert {t["target"]: t["met"] for t in bench_report.targets(figures, ["mixed_bfloat16", "float32"])}[
        "min cosine vs float32 (mixed_bfloat16)"
    ] is False


def test_sweep_speed_up_is_the_ratio_of_the_two_sweeps_and_has_a_target():
    sweep = {
        "heads": 8,
        "jobs": {"1": {"seconds": bench_report.summarize([90.0])}, "2": {"seconds": bench_report.summarize([50.0])}},
    }
    figures = bench_report.derived({"sweep": sweep}, "float32")
    assert figures == {"sweep speed-up, --jobs 2 over --jobs 1": 1.8}
    [target] = [t for t in bench_report.targets(figures, ["float32"]) if t["target"].startswith("sweep")]
    assert (target["required"], target["met"]) == (">= 1.6", True)


def test_a_sweep_file_runs_every_head_the_same_epochs(tmp_path):
    import tomllib

    sweep = tomllib.loads(bench_stage_two.sweep_file(tmp_path / "s.toml", 8, 3).read_text())
    assert sweep["base"] == {"epochs": 3, "patience": 3}
    assert len(sweep["grid"]["hidden"]) * len(sweep["grid"]["dropout"]) * len(sweep["grid"]["seed"]) == 8
    with pytest.raises(ValueError, match="multiple of 4"):
        bench_stage_two.sweep_file(tmp_path / "t.toml", 6, 3)


def test_summarize_and_ratio():
    assert bench_report.summarize([3, 1, 2]) == {"min": 1.0, "median": 2.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}
    assert bench_report.ratio(bench_report.summarize([9, 10, 11]), bench_report.summarize([4, 5, 6])) == 2.0
    assert bench_report.ratio(None, 3) is None
    assert bench_report.ratio(3, 0) is None


def _run(images, start_to_end, steady):
    return {
        "images": images,
        "images_per_second": bench_report.summarize([start_to_end]),
        "steady_images_per_second": bench_report.summarize([steady]),
    }


def test_break_even_corpus_sizes_follow_the_fixed_costs():
    # extract: 64 images at 4/s start to end, 10/s steady -> 0.1 s per image + 9.6 s fixed.
    # model bound 10/s: 0.9 x needs 0.1 n >= 0.9 (0.1 n + 9.6), n >= 864.
    # baseline: 64 images at 2/s, 2.5/s steady -> 0.4 s per image + 6.4 s; 2 x needs 0.4 n + 6.4 >= 0.2 n + 19.2, n >= 64.
    results = {
        "model": {"float32": {"images_per_second": bench_report.summarize([10.0])}},
        "extract": {"float32": _run(64, 4.0, 10.0)},
        "baseline": _run(64, 2.0, 2.5),
    }
    figures = bench_report.derived(results, "float32")
    assert figures["images for start to manifest >= 0.9 x model bound (float32)"] == 864
    assert figures["images for start to end >= 2.0 x seed-style baseline (float32)"] == 64
    results["extract"]["float32"] = _run(64, 4.0, 8.0)  # steady below 0.9 x the model bound: no size reaches it
    assert "images for start to manifest >= 0.9 x model bound (float32)" not in bench_report.derived(results, "float32")


def test_ray_over_local_figures_and_break_even():
    # local: 64 images at 4/s start to end, 10/s steady -> 0.1 s per image + 9.6 s fixed.
    # ray: 64 images at 2/s, 10/s steady -> 0.1 s per image + 25.6 s; 0.9 x needs 0.1 n + 9.6 >= 0.9 (0.1 n + 25.6), n >= 1344.
    results = {"ray": {"float32": {"local": _run(64, 4.0, 10.0), "ray": _run(64, 2.0, 10.0)}}}
    figures = bench_report.derived(results, "float32")
    assert figures["ray engine / local engine, steady state (float32)"] == 1.0
    assert figures["ray engine / local engine, start to manifest (float32)"] == 0.5
    assert figures["images for ray start to manifest >= 0.9 x local (float32)"] == 1344
    met = {t["target"]: t["met"] for t in bench_report.targets(figures, ["float32"])}
    assert met["ray engine / local engine, steady state (float32)"] is True
    assert met["ray engine / local engine, start to manifest (float32)"] is False


def test_targets_compare_against_their_thresholds():
    figures = {
        "end to end / model bound, steady state (mixed_bfloat16)": 0.95,
        "end to end / model bound, start to manifest (mixed_bfloat16)": 0.5,
        "model bound / FLOP bound (float32)": 0.8,
        "reduce peak RSS at the largest size (MB)": 1536,
    }
    met = {t["target"]: t["met"] for t in bench_report.targets(figures, ["mixed_bfloat16", "float32"])}
    assert met["end to end / model bound, steady state (mixed_bfloat16)"] is True
    assert met["end to end / model bound, start to manifest (mixed_bfloat16)"] is False
    assert met["model bound / FLOP bound (float32)"] is True  # >= is inclusive
    assert met["reduce peak RSS at the largest size (MB)"] is False  # < is strict
    assert met["model bound / FLOP bound (mixed_bfloat16)"] is None


def test_count_flops_counts_every_conv_and_dense_once_also_nested():
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)  # 2 * 10*10 * 3*3*3*8
    x = keras.layers.Conv2D(16, 3, strides=2)(x)  # 2 * 4*4 * 3*3*8*16
    x = keras.layers.GlobalAveragePooling2D()(x)
    inner = keras.Model(inputs, keras.layers.Dense(5)(x))  # 2 * 16*5
    expected = 2 * 100 * 216 + 2 * 16 * 1152 + 2 * 80
    assert count_flops(inner) == expected
    outer_input = keras.Input((10, 10, 3))
    assert count_flops(keras.Model(outer_input, inner(outer_input))) == expected


def test_count_flops_of_a_tap_model_stops_at_the_deepest_tap():
    trunks = {"vgg16": backbones.build_backbone("vgg16", 32)}
    model = backbones.build_tap_model(trunks, ("vgg16/block1_conv2",), "avg", 32)
    assert count_flops(model) == 2 * 32 * 32 * (3 * 3 * 3 * 64 + 3 * 3 * 64 * 64)  # the preprocessing multiplies nothing


def test_matmul_rate_is_two_size_cubed_flops_per_timed_call(monkeypatch):
    """On a clock that ticks 0.25 s per reading, each of the repeats (not the warm-up) is 2 x 64^3 FLOPs in 0.25 s.

    Regression: this test asserted only that the rates were positive, which no wrong formula fails.
    """
    ticks = itertools.count(step=0.25)
    monkeypatch.setattr(bench_flops, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    rates = matmul_gflops("float32", 64, 3)
    assert rates == pytest.approx([2 * 64**3 / 0.25 / 1e9] * 3)


def test_corpus_is_deterministic_jpegs_near_the_photo_size(tmp_path):
    write_corpus(tmp_path / "a", 8)
    write_corpus(tmp_path / "b", 8)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 8 and {f.parts[0] for f in files} == {"china", "flower"}
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        with Image.open(tmp_path / "a" / name) as image:
            assert image.format == "JPEG"
            long_side, short_side = max(image.size), min(image.size)
            assert 0.9 * PHOTO_SIZE[0] <= long_side <= 1.1 * PHOTO_SIZE[0] + 1
            assert 0.9 * PHOTO_SIZE[1] <= short_side <= 1.1 * PHOTO_SIZE[1] + 1


def test_seed_style_baseline_writes_one_dataset_per_tap(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 3)
    paths = sorted(str(p) for p in corpus.rglob("*.jpg"))
    taps = ("resnet50/conv1_relu", "vgg16/block1_conv2")
    done = []
    seed_style_baseline(paths, taps, 32, 2, "random", 0, tmp_path / "features.h5", done.append)
    assert done == [2, 1]
    with h5py.File(tmp_path / "features.h5") as f:
        assert sorted(f) == ["resnet50", "vgg16"]
        assert f["resnet50/conv1_relu"].shape == (3, 64) and f["vgg16/block1_conv2"].shape == (3, 64)
        assert np.isfinite(f["vgg16/block1_conv2"][:]).all()


def test_synthetic_features_verify_and_a_prefix_is_whole_shards(tmp_path):
    dims = dict(zip(bench_stage_two.DEFAULT_TAP_DIMS, (4, 4, 2, 2)))
    full = bench_stage_two.write_synthetic_features(tmp_path / "full", 30, 10, dims)
    assert shards.verify(full) == []
    prefix = bench_stage_two.prefix_features(full, tmp_path / "prefix", 20)
    assert shards.verify(prefix) == [] and shards.read_manifest(prefix)["rows"] == 20
    with h5py.File(prefix / "shard-00000.h5") as f:
        assert f["features/resnet50/conv5_block3_out"].dtype == np.float16
    with pytest.raises(ValueError, match="not a whole number"):
        bench_stage_two.prefix_features(full, tmp_path / "odd", 15)


def test_measure_reduce_reports_the_child_process_own_peak_rss(tmp_path):
    dims = dict(zip(bench_stage_two.DEFAULT_TAP_DIMS, (8, 8, 8, 8)))
    features = bench_stage_two.write_synthetic_features(tmp_path / "features", 100, 50, dims)
    ballast = np.ones(400 * 2**20 // 8)  # 400 MB in this process must not show up in the child's figure
    measured = bench_stage_two.measure_reduce(features, tmp_path / "reduced", ReduceConfig(solver="incremental", components=4))
    del ballast
    assert (tmp_path / "reduced" / "reduced.h5").is_file()
    assert measured["seconds"] > 0
    assert 20 < measured["peak_rss_mb"] < 400


def test_measure_load_reports_the_reader_s_rate_and_memory_against_its_arrays(tmp_path):
    dims = dict(zip(bench_stage_two.DEFAULT_TAP_DIMS, (64, 64, 64, 64)))
    features = bench_stage_two.write_synthetic_features(tmp_path / "features", 4000, 1000, dims)
    measured = bench_stage_two.measure_load(features)
    assert measured["rows"] == 4000 and measured["arrays_mb"] == pytest.approx(4000 * 256 * 2 / 2**20)  # float16 stays float16
    assert (
        measured["gb_per_second"] > 0 and measured["file_gb_per_second"] > 0 and measured["peak_rss_mb"] > measured["arrays_mb"]
    )


def test_options_reject_an_unknown_stage_naming_the_valid_ones():
    with pytest.raises(PipelineError, match="'decoding' is not one of model, extract, decode"):
        BenchOptions(skip=("decoding",))
    quick = BenchOptions.quick(images=5)
    assert (quick.images, quick.image_size) == (5, 64)


def test_cli_bench_help_lists_every_stage_and_bad_stage_is_one_line(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(cli, ["bench", "--help"]).output
    assert all(stage in help_text for stage in STAGES)
    result = runner.invoke(cli, ["bench", "--out", str(tmp_path), "--skip", "nope"])
    assert result.exit_code == 1
    assert "Error: bench stage 'nope' is not one of" in result.output


def test_results_page_gets_the_new_tables_between_its_markers_and_keeps_its_commentary():
    page = f"# Results\nintro\n{bench_report.RESULTS_START}\nold table\n{bench_report.RESULTS_END}\n\ncommentary\n"
    updated = bench_report.replace_results_table(page, "| new | table |\n")
    assert "old table" not in updated
    assert (
        updated == f"# Results\nintro\n{bench_report.RESULTS_START}\n| new | table |\n{bench_report.RESULTS_END}\n\ncommentary\n"
    )


def test_cli_bench_refuses_a_results_page_without_markers_before_running(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("# no markers here\n")
    result = CliRunner().invoke(cli, ["bench", "--out", str(tmp_path / "out"), "--results", str(page)])
    assert result.exit_code == 1
    assert "has no <!-- bench-table:start -->" in result.output
    assert not (tmp_path / "out").exists()  # refused before any stage ran
    assert page.read_text() == "# no markers here\n"


def test_the_shipped_results_page_has_one_table_block():
    from pathlib import Path

    page = (Path(bench_report.__file__).parent / "RESULTS.md").read_text()
    assert page.count(bench_report.RESULTS_START) == page.count(bench_report.RESULTS_END) == 1
