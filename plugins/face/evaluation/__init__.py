"""Face verification: aligned / unaligned pair sets, flip-fused embeddings, the Fig. 5 sweep."""
