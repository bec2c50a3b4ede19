"""Training: trainable masks, optimizer, jit-compiled train and eval steps."""
