"""Export side: backbones, training, fused-head ONNX export, calibration. Needs torch."""
