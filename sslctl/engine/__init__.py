"""Training engine: the fit loop, the LARS optimizer and the per-step schedules."""
