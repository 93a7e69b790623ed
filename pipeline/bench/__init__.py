"""`make bench`: every stage against its bound and the seed-style baseline.

runner     drives the stages and writes bench.json + bench.md
corpus     benchmark images cut from scikit-learn's sample photos
flops      analytic FLOPs of a Keras graph and the machine's matmul rate
stage_two  reduce and head experiments on synthetic shards
report     statistics, derived ratios, targets and the markdown table
"""
