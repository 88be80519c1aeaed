"""Fine-tuning methods, one file each; every module here registers its method on import."""
