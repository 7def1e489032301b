#!/usr/bin/env bash
# Wheels for a GPU machine without a package index. A JAX-with-CUDA image usually has jax/jaxlib with the CUDA
# plugin, flax, optax, orbax-checkpoint, numpy, scipy, pillow, matplotlib, h5py, etils, protobuf, pyarrow, ...,
# but not the packages below, which kd_landmarks and benchmarks/gpu_session.sh need. Run this on a machine
# that reaches PyPI, from anywhere: it writes the wheels for Python 3.12 on x86-64 Linux into the repository's
# .whl/ (about 11 MB); copy the repository with .whl/ to the GPU machine, where benchmarks/gpu_session.sh
# installs them with --no-index --no-deps. Keep .whl/ out of git, e.g.:
#   echo /.whl/ >> .git/info/exclude && bash benchmarks/gpu_wheels.sh
# PYTHON_VERSION=3.11 (or another) fetches wheels for another Python.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for package in grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
    ml-collections==1.1.0 tensorboardX==2.6.5 dm-tree immutabledict simple-parsing docstring-parser termcolor \
    toml googleapis-common-protos portpicker importlib_resources; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    "${platforms[@]}" -d .whl "${package}"
done
# tensorflow-datasets imports promise, which exists only as source: build its (pure Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
ls -l .whl
