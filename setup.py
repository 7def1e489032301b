"""kd_landmarks: KD-Loss facial landmark detection (Fard & Mahoor, CVIU 2022) in JAX/Flax."""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
# One version source: kd_landmarks/__init__.py (read, not imported: setup must not need the dependencies).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "kd_landmarks" / "__init__.py").read_text(),
                    re.M).group(1)

CORE = [
    "jax>=0.8",
    "jaxlib>=0.8",
    "flax>=0.10",
    "optax>=0.2",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.9",
    "array-record>=0.8",
    "grain>=0.2.12",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "scipy>=1.11",
    "h5py>=3.10",          # COFW .mat (v7.3 = HDF5)
    "pillow>=10.0",
    "matplotlib>=3.8",     # CED curves and overlays as PNG
    "tqdm>=4.66",
    "tensorboardX>=2.6",   # TensorBoard event files without TensorFlow
    "absl-py>=1.4",        # main.py flags
]

EXTRAS = {
    "test": ["pytest>=8.0", "hypothesis>=6.100"],
    # Export of a trained student to mobile/edge runtimes.
    "export": ["onnx>=1.16", "onnxruntime>=1.18", "jax2onnx>=0.17"],
    # TFLite/LiteRT export (jax2tf + tf.lite.TFLiteConverter) and its check with LiteRT's interpreter.
    # TensorFlow is imported only by kd_landmarks.export_tflite.
    "tflite": ["tensorflow>=2.18", "ai-edge-litert>=1.2"],
    # Landmarks on your own photos: dlib's HOG face detector (its model is inside the wheel).
    "predict": ["dlib-bin>=19.24"],
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
    # The native CPU kernel ships as source: it is compiled on first use (kd_landmarks/models/native). The real
    # fixture photo (export's check and calibration crops) ships with its BSD-3 licence.
    package_data={"kd_landmarks": ["data/takeo/*", "datasets/data/*", "models/native/*.cc",
                                   "models/native/*.h"]},
    license="Apache-2.0",
    license_files=["LICENSE", "NOTICE", "kd_landmarks/data/takeo/LICENSE"],
    # The python -m forms keep working; these are the same main functions.
    entry_points={"console_scripts": [
        "kd-landmarks = kd_landmarks.main:entry_point",
        "kd-landmarks-predict = kd_landmarks.predict:main",
        "kd-landmarks-export = kd_landmarks.export:main",
        "kd-landmarks-datasets = kd_landmarks.datasets.__main__:main",
    ]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
