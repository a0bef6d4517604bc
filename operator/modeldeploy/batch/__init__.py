"""BatchInference: offline scoring of a data set with Triton, sharded over an Indexed Job."""
