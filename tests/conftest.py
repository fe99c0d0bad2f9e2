"""Test set-up: CPU only, 8 fake devices (must run before JAX initialises its backends).

XLA:CPU backend optimisations are turned down for the tests: compile time dominates this suite and the
numbers are unchanged (tests compare against references with tolerances). Benchmarks run with the defaults.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
