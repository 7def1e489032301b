"""Runs ONNX files on uint8 images in ONNX Runtime and saves the outputs; no JAX (it runs under qemu too).

  python tests/ort_worker.py IMAGES.npy OUT.npz NAME=MODEL.onnx [NAME=MODEL.onnx ...]
"""
import sys

import numpy as np
import onnxruntime as ort


def main(images_path, out_path, *named_models):
  images = np.load(images_path)
  outputs = {}
  for item in named_models:
    name, path = item.split("=", 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    outputs[name] = session.run(None, {session.get_inputs()[0].name: images})[0]
  np.savez(out_path, **outputs)


if __name__ == "__main__":
  main(*sys.argv[1:])
