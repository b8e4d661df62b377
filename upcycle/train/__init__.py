"""Continued training of upcycled models: recipe, data, loop, checkpoints, export (see upcycle.train.loop)."""
