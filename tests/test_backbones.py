import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from pipeline import backbones
from pipeline.config import WeightSource, parse_weights
from pipeline.errors import PipelineError
from pipeline.layers import CAFFE_MEAN_BGR, CaffePreprocess, caffe_preprocessing


def test_catalogue_declares_shapes_and_strides():
    catalogue = {info.key: info for info in backbones.tap_catalogue("resnet50", backbones.build_backbone("resnet50", 64))}
    out = catalogue["resnet50/conv4_block6_out"]
    assert (out.height, out.width, out.channels, out.stride) == (4, 4, 1024, 16)
    assert catalogue["resnet50/conv5_block3_out"].channels == 2048
    vgg = {info.key: info for info in backbones.tap_catalogue("vgg16", backbones.build_backbone("vgg16", 64))}
    assert vgg["vgg16/block5_conv3"].stride == 16 and vgg["vgg16/block1_conv1"].stride == 1


def test_an_unknown_tap_fails_listing_the_valid_ones():
    with pytest.raises(
        PipelineError, match=r"unknown tap 'vgg16/block9_conv1'; valid vgg16 layers are: block1_conv1, .*block5_pool"
    ):
        backbones.check_taps(["vgg16/block9_conv1"], {"vgg16": backbones.build_backbone("vgg16", 32)})


def test_each_backbone_is_cut_at_its_deepest_tap_and_preprocessing_is_shared():
    trunks = {name: backbones.build_backbone(name, 32) for name in ("resnet50", "vgg16")}
    model = backbones.build_tap_model(trunks, ["resnet50/conv2_block1_out", "vgg16/block2_pool"], "avg", 32)
    inner = {sub.name: {layer.name for layer in sub.layers} for sub in model.layers if isinstance(sub, keras.Model)}
    assert "conv2_block1_out" in inner["resnet50_taps"]
    assert not any(name.startswith(("conv3", "conv4", "conv5")) for name in inner["resnet50_taps"])
    assert "block2_pool" in inner["vgg16_taps"] and not any(n.startswith("block3") for n in inner["vgg16_taps"])
    assert [layer.name for layer in model.layers if layer.name.startswith("caffe")] == ["caffe_preprocess"]
    outputs = model(np.zeros((2, 32, 32, 3), np.float32))
    assert outputs["resnet50/conv2_block1_out"].shape == (2, 256)
    assert outputs["vgg16/block2_pool"].shape == (2, 128)


def test_the_caffe_preprocessing_flips_and_subtracts_bit_for_bit_without_a_matmul(tmp_path):
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)  # resized: not integers
    reference = pixels[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, np.float32)  # numpy, in float32
    images = keras.Input((5, 7, 3), dtype="float32")
    model = keras.Model(images, caffe_preprocessing(images))
    np.testing.assert_array_equal(np.asarray(model(pixels)), reference)
    np.testing.assert_array_equal(
        np.asarray(model(pixels)), keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode="caffe")
    )
    np.testing.assert_array_equal(np.asarray(CaffePreprocess()(pixels)), reference)  # the layer older exports hold
    assert not [
        layer for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
    ]  # nothing TF32 rounds
    model.save(tmp_path / "caffe.keras")  # and it saves and loads with plain Keras
    np.testing.assert_array_equal(np.asarray(keras.saving.load_model(tmp_path / "caffe.keras")(pixels)), reference)


def test_avgmax_pooling_concatenates_avg_then_max():
    trunks = {"vgg16": backbones.build_backbone("vgg16", 32)}
    backbones.load_weights(trunks["vgg16"], "vgg16", WeightSource("random", seed=0))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    both = backbones.build_tap_model(trunks, ["vgg16/block1_pool"], "avgmax", 32)(x)["vgg16/block1_pool"]
    avg = backbones.build_tap_model(trunks, ["vgg16/block1_pool"], "avg", 32)(x)["vgg16/block1_pool"]
    mx = backbones.build_tap_model(trunks, ["vgg16/block1_pool"], "max", 32)(x)["vgg16/block1_pool"]
    np.testing.assert_allclose(np.asarray(both), np.concatenate([avg, mx], axis=1), rtol=1e-6)


@pytest.mark.parametrize(
    "requested, gpu, flags, expected",
    [
        ("auto", True, {"avx512_bf16"}, "mixed_float16"),
        ("auto", False, {"avx2", "avx512_bf16"}, "mixed_bfloat16"),
        ("auto", False, {"amx_bf16", "amx_tile"}, "mixed_bfloat16"),
        ("auto", False, {"avx2", "avx512f"}, "float32"),
        ("float32", True, set(), "float32"),
        ("mixed_bfloat16", False, set(), "mixed_bfloat16"),
    ],
)
def test_policy_selection(requested, gpu, flags, expected):
    assert backbones.choose_policy(requested, gpu, frozenset(flags)) == expected


def test_reduced_precision_outputs_float32_features_close_to_float32():
    trunks = {"resnet50": backbones.build_backbone("resnet50", 32)}
    backbones.load_weights(trunks["resnet50"], "resnet50", WeightSource("random", seed=0))
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    tap = "resnet50/conv4_block6_out"
    reference = np.asarray(backbones.build_tap_model(trunks, [tap], "avg", 32)(x)[tap])
    low_trunk = backbones.build_backbone("resnet50", 32, policy="mixed_bfloat16")
    low_trunk.set_weights(trunks["resnet50"].get_weights())
    low = backbones.build_tap_model({"resnet50": low_trunk}, [tap], "avg", 32)(x)[tap]
    assert low.dtype == "float32"
    low = np.asarray(low)
    cosine = np.sum(low * reference, 1) / np.linalg.norm(low, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(low, reference)  # it really ran in bfloat16
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_random_weights_are_seeded_and_fingerprinted():
    fingerprints = []
    for seed in (0, 0, 1):
        model = backbones.build_backbone("vgg16", 32)
        backbones.load_weights(model, "vgg16", WeightSource("random", seed=seed))
        fingerprints.append(backbones.weights_fingerprint(model))
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_a_weights_file_loads_and_matches_its_source(tmp_path):
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    source.save_weights(tmp_path / "vgg.weights.h5")
    sources = parse_weights(f"vgg16={tmp_path / 'vgg.weights.h5'}", ("vgg16",), seed=0)
    assert sources["vgg16"].to_record() == {"kind": "file", "path": str(tmp_path / "vgg.weights.h5")}
    model = backbones.build_backbone("vgg16", 32)
    backbones.load_weights(model, "vgg16", sources["vgg16"])
    assert backbones.weights_fingerprint(model) == backbones.weights_fingerprint(source)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagenet21k", "is not imagenet, random or BACKBONE=PATH"),
        ("alexnet=a.h5", "is not imagenet, random or BACKBONE=PATH"),
        ("resnet50=random", "gives no weights for vgg16"),
        ("resnet50=random,vgg16=/no/such.h5", "weights file /no/such.h5 for vgg16 does not exist"),
    ],
)
def test_bad_weight_specs(spec, message):
    with pytest.raises(PipelineError, match=message):
        parse_weights(spec, ("resnet50", "vgg16"), seed=0)


def test_a_file_that_is_not_weights_fails_clearly(tmp_path):
    (tmp_path / "w.weights.h5").write_text("nope")
    model = backbones.build_backbone("vgg16", 32)
    with pytest.raises(PipelineError, match="could not load vgg16 weights from"):
        backbones.load_weights(model, "vgg16", WeightSource("file", path=str(tmp_path / "w.weights.h5")))


def test_imagenet_offline_says_where_to_put_the_file(tmp_path):
    """In a subprocess: Keras reads KERAS_HOME when it is imported, so setting it in this process would not reach Keras."""
    script = textwrap.dedent("""
        from pipeline import backbones
        from pipeline.config import WeightSource
        from pipeline.errors import PipelineError

        try:
            backbones.load_weights(backbones.build_backbone("vgg16", 32), "vgg16", WeightSource("imagenet"))
        except PipelineError as e:
            print(e)
    """)
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    message = done.stdout
    assert "could not get ImageNet weights for vgg16" in message
    assert f"vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 in {tmp_path / 'keras' / 'models'}" in message
    assert "--weights random" in message and "--weights vgg16=PATH" in message


@pytest.mark.parametrize(
    "record, expected",
    [
        ("imagenet", WeightSource("imagenet")),
        ("random(seed=7)", WeightSource("random", seed=7)),
        ("/models/vgg.weights.h5", WeightSource("file", path="/models/vgg.weights.h5")),
        ({"kind": "random", "seed": 3}, WeightSource("random", seed=3)),
    ],
)
def test_weight_sources_load_from_records_old_and_new(record, expected):
    source = WeightSource.from_record(record)
    assert source == expected
    assert WeightSource.from_record(source.to_record()) == source


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_eager_and_traced_forward_agree(policy):
    trunk = backbones.build_backbone("resnet50", 32, policy)
    backbones.load_weights(trunk, "resnet50", WeightSource("random", seed=0))
    model = backbones.build_tap_model({"resnet50": trunk}, ["resnet50/conv3_block1_out"], "avg", 32)
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    traced = backbones.compile_forward(model, 32, xla=False, trace=True)(x)["resnet50/conv3_block1_out"]
    eager = model(x, training=False)["resnet50/conv3_block1_out"]
    np.testing.assert_allclose(np.asarray(eager), np.asarray(traced), rtol=1e-6, atol=1e-6 * float(np.abs(traced).max()))


_COMPILE_ONCE = """
import sys
import tensorflow as tf
from pipeline import backbones

backbones.persist_xla_programs()
double = tf.function(lambda x: x * 2.0 + 1.0, jit_compile=True)
print(float(double(tf.constant(3.0))))
"""


def test_xla_programs_are_kept_in_the_keras_cache_dir_for_later_processes(tmp_path):
    """The flag exists in this TensorFlow: a compiled program lands in $KERAS_HOME/xla, and a second process reads it."""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_XLA_FLAGS", None)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _COMPILE_ONCE], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "7.0", done.stderr[-2000:]
    programs = sorted(p.name for p in (tmp_path / "keras" / "xla").iterdir())
    assert len(programs) == 1 and programs[0].startswith("xla_compile_cache")  # compiled once, found the second time


def test_a_cache_dir_already_in_tf_xla_flags_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TF_XLA_FLAGS", f"--tf_xla_auto_jit=2 {backbones.XLA_CACHE_FLAG}=/elsewhere")
    backbones.persist_xla_programs()
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=2 {backbones.XLA_CACHE_FLAG}=/elsewhere"
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    backbones.persist_xla_programs()
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=2 {backbones.XLA_CACHE_FLAG}={tmp_path / 'xla'}"
