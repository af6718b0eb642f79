"""BehaviorSFT training: its config, the run and sweep layout on disk, data, the worker recipe, the driver, and
Ray Tune sweeps."""
