"""One module per task (train, prune, fuse); a pipeline stage is `task.run(cfg, run_dir)`."""
