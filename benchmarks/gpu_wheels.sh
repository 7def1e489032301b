#!/usr/bin/env bash
# The Python packages kd_landmarks needs that the lent GPU machine's image lacks (it has jax/jaxlib with the
# CUDA plugin, flax, optax, orbax-checkpoint, numpy, scipy, pillow, matplotlib, h5py, etils, protobuf,
# pyarrow, ...; not these), as wheels for its Python 3.12, into .whl/ (about 11 MB). Run here, where pip
# reaches the registry, from the repository root; .whl/ must be git-ignored and carried by the device run:
#   echo /.whl/ >> .git/info/exclude && bash benchmarks/gpu_wheels.sh
# benchmarks/gpu_session.sh installs them there with --no-index --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for package in grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
    ml-collections==1.1.0 tensorboardX==2.6.5 dm-tree immutabledict simple-parsing docstring-parser termcolor \
    toml googleapis-common-protos portpicker importlib_resources; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${package}"
done
# tensorflow-datasets imports promise, which exists only as source: build its (pure Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
ls -l .whl
