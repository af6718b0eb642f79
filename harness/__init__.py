"""behaviorbench-harness: BehaviorSFT training and BehaviorBench evaluation on Ray."""

__version__ = "0.1.0"
