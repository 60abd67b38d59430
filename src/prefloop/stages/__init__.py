"""The pipeline: one module per stage, each with `run(recipe, run_dir)`."""
