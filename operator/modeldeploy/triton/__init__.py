"""What is specific to Triton Inference Server: config.pbtxt rendering, model repository staging, and
analysis on Triton's metrics."""
