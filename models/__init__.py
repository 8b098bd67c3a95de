"""Model families (Flax), one file per family; shared blocks in layers.py."""
