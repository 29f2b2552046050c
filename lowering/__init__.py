"""Lowerings: ONNX, TVM and FPGA."""
