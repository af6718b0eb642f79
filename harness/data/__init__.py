"""BehaviorBench data: the task record, the taxonomy, reading and validating task files, and BehaviorBench-mini."""
