"""Support for the tests, the checking scripts and the benchmarks, not for training code: the fp64 ground truth
(ground_truth), deliberate defects that show the checks can fail (faults), the layer shapes of the benchmark
tables (shapes), the comparison of two implementations the checking scripts print (compare) and a small GPT to
train with any MLP (gpt, which needs the [validate] extra)."""
