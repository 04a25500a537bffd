"""Training objectives: the diffusion objective and sampler (`diffusion`) and the CAMEO alignment loss (`alignment`)."""
