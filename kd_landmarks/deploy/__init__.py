"""Deployment: landmarks on photos (predict, face detection), export to ONNX and TFLite, model cards."""
