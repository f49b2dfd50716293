"""Training data: records, datasets, mixtures, augmentation, packing, and the synthetic visual world."""
