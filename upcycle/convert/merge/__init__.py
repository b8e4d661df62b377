"""`upcycle merge`: an MoE whose experts are the MLPs of several dense models of one shape (Branch-Train-MiX,
mergekit-moe), read from mergekit-moe's own YAML format."""
