"""Model definitions served by import path (e.g. models.seed_fcn:MyModel) and the default config."""
