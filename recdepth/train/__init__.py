"""The training job: wiring, loop, optimizer, schedules, checkpoints, evaluation, metrics."""
