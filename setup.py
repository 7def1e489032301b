"""kd_landmarks: KD-Loss facial landmark detection (Fard & Mahoor, CVIU 2022) in JAX/Flax."""
from setuptools import find_packages, setup

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
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["kd_landmarks", "kd_landmarks.*"]),
    # The native CPU kernel ships as source: it is compiled on first use (kd_landmarks/models/native).
    package_data={"kd_landmarks": ["data/*", "datasets/data/*", "models/native/*.cc", "models/native/*.h"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
