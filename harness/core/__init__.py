"""The ground floor: errors, atomic files, names, config loading, storage locations and the Ray cluster.

Nothing here knows about tasks, models, training or evaluation."""
