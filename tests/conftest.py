"""Test set-up: 8 fake CPU devices so multi-device code paths run on a laptop, and hypothesis profiles."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu is installed for the TPU-compiler tests (tests/test_tpu_compile.py): JAX must not try to start a
# TPU here, and several processes (pytest workers, subprocesses) may load libtpu to compile for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")
