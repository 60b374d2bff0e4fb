"""Building blocks shared by the model families: norms, rotary, MLP, attention front, embeddings."""
