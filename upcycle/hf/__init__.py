"""What transformers will do with a config and a folder: configs, module discovery, meta skeletons, loading, and
the config probe that proves two configs compute the same function. Below conversion and verification; reads
nothing of either."""
