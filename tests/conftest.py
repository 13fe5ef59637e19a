import os

# Quieter Ray in the simulation tests; set before Ray is imported.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
