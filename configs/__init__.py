"""Hydra YAML of the ginseng command line, installed as the package ``ginseng.configs``."""
