"""The launch scripts, shipped inside the package as ginseng.launchers (see ginseng/local.py)."""
