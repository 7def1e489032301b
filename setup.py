"""kd_landmarks: KD-Loss facial landmark detection (Fard & Mahoor, CVIU 2022) in JAX/Flax."""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
# One version source: kd_landmarks/__init__.py (read, not imported: setup must not need the dependencies).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "kd_landmarks" / "__init__.py").read_text(),
                    re.M).group(1)

# Lower bounds = the versions the test suite runs against (pip list of the development venv, Python 3.11);
# older ones are never exercised. jax 0.10 itself needs Python >= 3.11, numpy >= 2.0 and scipy >= 1.14.
CORE = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.11.36",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "grain>=0.2.18",
    "ml-collections>=1.1.0",
    "numpy>=2.4",
    "scipy>=1.17",
    "h5py>=3.16",          # COFW .mat (v7.3 = HDF5)
    "pillow>=13.0",
    "matplotlib>=3.11",    # CED curves and overlays as PNG
    "tqdm>=4.70",
    "tensorboardX>=2.6.5", # TensorBoard event files without TensorFlow
    "absl-py>=2.5",        # main.py flags
]

EXTRAS = {
    # Accelerators: jax's own extras pull the matching PJRT plugin (and, for CUDA, NVIDIA's libraries as
    # wheels); without one JAX runs on the CPU only. 'gpu': CUDA 12 (NVIDIA driver >= 525); 'cuda13':
    # driver >= 580; 'tpu': libtpu on a Cloud TPU VM. README, "Installing for a GPU or a TPU".
    "gpu": ["jax[cuda12]>=0.10.2"],
    "cuda13": ["jax[cuda13]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "test": ["pytest>=8.0", "hypothesis>=6.100"],
    # Export of a trained student to mobile/edge runtimes.
    "export": ["onnx>=1.16", "onnxruntime>=1.18", "jax2onnx>=0.17"],
    # TFLite/LiteRT export (jax2tf + tf.lite.TFLiteConverter) and its check with LiteRT's interpreter.
    # TensorFlow is imported only by kd_landmarks.deploy.export_tflite.
    "tflite": ["tensorflow>=2.18", "ai-edge-litert>=1.2"],
    # Landmarks on your own photos: dlib's HOG face detector (its model is inside the wheel).
    "predict": ["dlib-bin>=19.24"],
    # Landmarks on video files: PyAV reads and writes them (FFmpeg, with libx264, is inside its wheel).
    "video": ["av>=18.1"],
    # Side-by-side comparisons with peer frameworks and detectors people use today.
    "bench": [
        "torch==2.13.0",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "dlib-bin>=19.24",
        "face_recognition_models>=0.3",
        "ai-edge-litert>=1.0",
    ],
}

setup(
    name="kd_landmarks",
    version=VERSION,
    description=__doc__,
    packages=find_packages(include=["kd_landmarks", "kd_landmarks.*"]),
    # The native CPU kernel ships as source: it is compiled on first use (kd_landmarks/cpu/native). The real
    # fixture photo (export's check and calibration crops) ships with its BSD-3 licence.
    package_data={"kd_landmarks": ["data/takeo/*", "datasets/data/*", "cpu/native/*.cc",
                                   "cpu/native/*.h"]},
    license="Apache-2.0",
    license_files=["LICENSE", "NOTICE", "kd_landmarks/data/takeo/LICENSE"],
    # The python -m forms keep working; these are the same main functions.
    entry_points={"console_scripts": [
        "kd-landmarks = kd_landmarks.main:entry_point",
        "kd-landmarks-predict = kd_landmarks.deploy.predict:main",
        "kd-landmarks-export = kd_landmarks.deploy.export:main",
        "kd-landmarks-datasets = kd_landmarks.datasets.__main__:main",
    ]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
