"""Run configurations: `configs/<file>.py:<run>` for the CLIs, or `configs.paper.get_config`."""
