"""Synthetic faces with ground-truth landmarks: parameters, renderer, dataset and pair sets."""
