"""moe_dist's profiling tools: straggler timers and analysis, reports, what-if projections, the imbalance
sweep, benchmarks, the balance study, and a TensorBoard launcher that counts all-to-all ops."""
