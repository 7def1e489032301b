"""Training: the train state and steps, the fit loop, the input pipeline, devices, checkpoints."""
