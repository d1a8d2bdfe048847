"""Post-training quantization: calibration capture, GPTQ, AWQ, SmoothQuant, Hadamard
rotations, cross-layer equalization and bias correction, HQQ-style weight fitting,
mixed-precision bit allocation, and LoRA on a quantized base."""
