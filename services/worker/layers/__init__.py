"""Building blocks shared by the model families; all device math goes through a KernelOps bundle."""
