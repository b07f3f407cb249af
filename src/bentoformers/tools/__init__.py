"""Tools beside the service: the benchmarks, the GPU check, and the small models the tests and both build."""
