"""`make bench`: every stage against its bound and the seed-style baseline.

runner     drives the stages and writes bench.json + bench.md
corpus     benchmark images cut from scikit-learn's sample photos
flops      analytic FLOPs of a Keras graph and the machine's matmul rate
stage_two  reduce and head experiments on synthetic shards
stacks     many heads as one program: the digits sweep against the plain Keras loop, stacked against --no-stack
report     statistics, derived ratios, targets and the markdown table
startup    fresh-process start-up: first batch, up-to-date rerun, predict on one image
update     reruns after adding or removing 1% of the images, and with no change; the sha256 cost per image
"""

# Every stage `pipeline bench --skip` can leave out, in the order they run.
STAGES = (
    "model",
    "extract",
    "decode",
    "baseline",
    "flops",
    "fast-decode",
    "ray",
    "startup",
    "update",
    "reduce",
    "heads",
    "sweep",
    "stacks",
)
