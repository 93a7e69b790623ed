"""Stage one with 1 and with 2 TensorFlow intra-op threads gives the same features (engines.FEATURE_RTOL).

Each run is a fresh process, because TensorFlow sizes its thread pools once per process.
`ONEDNN_MAX_CPU_ISA=AVX2` makes oneDNN use the kernels of an AVX2-only CPU (no AVX-512), the
kind on which the thread count was seen to move the last digits, so a machine with AVX-512
checks both kinds.
"""

import os
import subprocess
import sys

import pytest

from same_features import assert_same_features

ARGS = [
    "--weights",
    "random",
    "--image-size",
    "32",
    "--tap",
    "resnet50:conv2_block1_out",
    "--tap",
    "vgg16:block1_pool",
    "--shard-size",
    "3",
]


@pytest.mark.parametrize("isa", [pytest.param(None, marks=pytest.mark.slow), "AVX2"])  # AVX2 only is the kind at risk
def test_one_and_two_intra_op_threads_give_the_same_features(tmp_path, image_tree, isa):
    root = image_tree(per_class=3)
    precision = ["--precision", "float32"] if isa else []  # `auto` on an AVX2-only CPU is float32
    runs = {}
    for threads in (1, 2):
        env = {**os.environ, "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads)}
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        argv = [
            sys.executable,
            "-m",
            "pipeline",
            "extract",
            str(root),
            "--out",
            str(tmp_path / f"threads-{threads}"),
            *ARGS,
            *precision,
        ]
        runs[threads] = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for run in runs.values():
        output = run.communicate(timeout=600)
        assert run.returncode == 0, output
        assert "extracted 6 rows, 0 errors" in output[0]
    assert_same_features(tmp_path / "threads-1", tmp_path / "threads-2")
