"""The outer loop over islands of devices: DiLoCo (diloco.py) and its compressed exchange."""
