"""Small reference models for the main job, the tests and the benchmarks."""
